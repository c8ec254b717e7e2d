"""Does `--minutes M` bound the whole training run?

    .venv/bin/python benchmarks/train_minutes.py --data IDRID_TRAIN [--minutes 2]

IDRID_TRAIN: an IDRiD-layout training folder (images and masks).

Runs `python -m training exudates --minutes M` (CPU, everything else the recipe's defaults) on
an IDRiD-layout folder into a temporary model folder, and measures the wall-clock time of the
whole process: starting Python, loading the images, training and the last validation. The bound
is M + max(30 s, 10 % of M). Prints the time against the bound, how the run was spent (from its
JSON-lines log: preparation, first progress event, last validation) and the command; exits 1
when the run took longer than the bound (or failed).
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import shlex
import subprocess
import sys
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, metavar="DIR",
                   help="an IDRiD-layout training folder (images and lesion masks)")
    p.add_argument("--minutes", type=float, default=2.0)
    p.add_argument("--device", default="cpu")
    a = p.parse_args()
    bound = 60 * a.minutes + max(30.0, 6.0 * a.minutes)
    with tempfile.TemporaryDirectory() as tmp:
        out = Path(tmp) / "exudates"
        cmd = [sys.executable, "-m", "training", "exudates", "--data", a.data, "--out", str(out),
               "--minutes", f"{a.minutes:g}", "--device", a.device]
        env = {**os.environ, "NAPARI_RETINA_DATA": str(Path(tmp) / "user-data"),
               "PYTHONPATH": os.pathsep.join(filter(None, [str(ROOT), os.environ.get("PYTHONPATH")]))}
        t0 = time.monotonic()
        r = subprocess.run(cmd, cwd=ROOT, env=env, capture_output=True, text=True)
        took = time.monotonic() - t0
        log = []
        try:
            log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
        except (OSError, ValueError):
            pass
        model = (out / "config.json").is_file()
        figure = None
        if model:
            figure = json.loads((out / "config.json").read_text())["training"].get("val_aupr_working_scale")
    prepare = [e for e in log if e["event"] == "prepare"]
    steps = [e for e in log if e["event"] == "step"]
    epochs = [e for e in log if e["event"] == "epoch"]
    validate = [e for e in log if e["event"] == "validate"]
    end = next((e for e in log if e["event"] == "end"), {})
    print(f"python -m training exudates --minutes {a.minutes:g}: {took:.1f} s wall clock, bound {bound:.0f} s "
          f"({'within' if took <= bound else 'OVER'}); exit {r.returncode}")
    if prepare:
        print(f"  data preparation: {len(prepare)} images by {prepare[-1]['elapsed']:.1f} s")
    if steps:
        print(f"  first progress event at {(prepare or steps)[0]['elapsed']:.1f} s; first step at "
              f"{steps[0]['elapsed']:.1f} s; {end.get('steps', steps[-1]['step'])} steps in "
              f"{len(epochs)} epoch(s)")
    if validate:
        print(f"  last validation from {validate[-1]['elapsed']:.1f} s (expected {validate[-1]['expected']:.0f} s); "
              f"run ended at {end.get('elapsed', float('nan')):.1f} s by the run's own clock, "
              f"stopped by {end.get('stopped', '?')}")
    print(f"  model written: {'yes' if model else 'no'}" + (f", validation AUPR {figure}" if figure is not None else ""))
    if r.returncode != 0:
        print("  " + (r.stderr.strip().splitlines() or ["?"])[-1])
    print(f"  machine: {platform.machine()}, {os.cpu_count()} CPUs, torch device {a.device}")
    print("command: " + shlex.join(["python", *cmd[1:]]))
    return 0 if took <= bound and r.returncode == 0 else 1


if __name__ == "__main__":
    sys.exit(main())
