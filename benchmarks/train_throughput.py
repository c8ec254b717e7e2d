"""Training throughput of every model on the machine it runs on, over a fixed number of steps, extrapolated.

    .venv/bin/python benchmarks/train_throughput.py --data IDRID_TRAIN [--steps 20] [--device cpu|cuda]
        [--models refiner exudates ma-hgn ma-prn] [--no-amp]

Runs `python -m training <model>` for one epoch of `--steps` x batch samples on the real data
(validation on two held-out images only), reads the trainer's `samples_per_s` from the run's
log (training steps only; loading and validation excluded), and extrapolates to one epoch of the
recipe's default size and to the epochs the model in use was trained for (its card). Prints a
table and the command. On a GPU machine, `--device cuda` gives the figures to set beside these.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import subprocess
import sys
import tempfile
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
# model -> (extra options, batch size, samples per epoch by default, the kind whose version in use we compare with)
MODELS = {
    "refiner": ([], 8, 1000, "refiner"),
    "exudates": (["--scale", "0.5"], 8, 1000, "exudates"),
    "ma-hgn": (["--scale", "1.0"], 8, 1000, "ma-hgn"),
    "ma-prn": ([], 16, 2000, "ma-prn"),
}
VAL = ["IDRiD_01.jpg", "IDRiD_02.jpg"]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--steps", type=int, default=20)
    p.add_argument("--device", default="cpu")
    p.add_argument("--models", nargs="+", default=list(MODELS), choices=list(MODELS))
    p.add_argument("--no-amp", action="store_true", help="float32 even where the device computes bfloat16 natively")
    a = p.parse_args()
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    rows = []
    for model in a.models:
        extra, batch, default_samples, kind = MODELS[model]
        out = Path(tempfile.mkdtemp()) / model
        cmd = [sys.executable, "-m", "training", model, "--data", a.data, "--out", str(out), "--epochs", "1",
               "--samples-per-epoch", str(a.steps * batch), "--batch-size", str(batch), "--device", a.device,
               "--val-images", *VAL, "--quiet", *extra, *(["--no-amp"] if a.no_amp else [])]
        r = subprocess.run(cmd, env=env, capture_output=True, text=True)
        if r.returncode != 0:
            print(f"{model}: failed: {(r.stderr.strip().splitlines() or ['?'])[-1]}", file=sys.stderr)
            continue
        log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
        epoch = [e for e in log if e.get("event") == "epoch"][-1]
        sps = float(epoch["samples_per_s"])
        sys.path.insert(0, str(ROOT))
        from napari_retina.models.versions import current_model_dir

        try:
            t = json.loads((current_model_dir(kind) / "config.json").read_text()).get("training", {})
            shipped = f"{t['epochs']} epochs, {float(t['minutes']):.0f} min on {t.get('device', '?')}"
            shipped_epochs = int(t["epochs"])
        except (OSError, ValueError, KeyError):
            shipped, shipped_epochs = "none shipped", None
        per_epoch = default_samples / sps / 60
        amp = [e for e in log if e.get("event") == "start"][-1].get("amp")
        precision = f"{amp} mixed precision" if amp else "float32"
        rows.append((model, f"{epoch.get('device', a.device)}, {precision}", sps, per_epoch, shipped,
                     f"{per_epoch * shipped_epochs:.0f} min" if shipped_epochs else "-"))
    print(f"\ntraining throughput, {a.steps} steps per model, {a.device}")
    print("| model | device | samples / s | min per default epoch (training only) | version in use | its epochs at this speed |")
    print("|---|---|---|---|---|---|")
    for model, dev, sps, per_epoch, shipped, again in rows:
        print(f"| {model} | {dev} | {sps:.1f} | {per_epoch:.1f} | {shipped} | {again} |")
    print(f"\nmachine: {platform.machine()}, {os.cpu_count()} CPUs; command: .venv/bin/python benchmarks/train_throughput.py "
          + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
