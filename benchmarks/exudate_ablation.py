"""The exudate loss ablation: BCE against BCE + patch-wise density + edge, for U-Net and UNet++.

    .venv/bin/python benchmarks/exudate_ablation.py --data IDRID_TRAIN --out runs/ablation \\
        [--minutes 60 | --epochs N] [--backbones unet unetpp] [--losses bce contrastive] [--device auto] [--resume]

Every run gets the same stated budget (the same --minutes or --epochs, the same data, split,
patches per epoch, seed and working scale), then the best weights of each are scored on the
same held-out images at full resolution by `napari-retina evaluate ex --split val`, and one
table is printed (pixel AUPR pooled over the split, F1 and IoU at each model's threshold,
lesion sensitivity, seconds per image) with the commands that made it. --resume continues
runs that were cut (the JSON of a finished evaluation is reused).
"""

from __future__ import annotations

import argparse
import json
import platform
import subprocess
import sys
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
VAL_IMAGES = ["IDRiD_01.jpg", "IDRiD_02.jpg", "IDRiD_08.jpg", "IDRiD_12.jpg", "IDRiD_17.jpg", "IDRiD_18.jpg",
              "IDRiD_22.jpg", "IDRiD_26.jpg", "IDRiD_27.jpg", "IDRiD_30.jpg", "IDRiD_50.jpg"]


def run(cmd: list[str], quiet: bool = False) -> None:
    print("+ " + " ".join(cmd), flush=True)
    subprocess.run(cmd, check=True, cwd=ROOT, stdout=subprocess.DEVNULL if quiet else None)


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--out", required=True, help="folder for one model folder per run")
    budget = p.add_mutually_exclusive_group(required=True)
    budget.add_argument("--minutes", type=float, help="wall-clock budget of each run")
    budget.add_argument("--epochs", type=int, help="epochs of each run")
    p.add_argument("--backbones", nargs="+", default=["unet", "unetpp"])
    p.add_argument("--losses", nargs="+", default=["bce", "contrastive"])
    p.add_argument("--samples-per-epoch", type=int, default=800)
    p.add_argument("--scale", type=float, default=0.5)
    p.add_argument("--device", default="auto")
    p.add_argument("--val-images", nargs="+", default=VAL_IMAGES, help="held-out images (default: the refiner's 11)")
    p.add_argument("--resume", action="store_true")
    a = p.parse_args()
    out = Path(a.out)
    out.mkdir(parents=True, exist_ok=True)
    py = sys.executable
    rows = []
    for backbone in a.backbones:
        for loss in a.losses:
            model = out / f"{backbone}-{loss}"
            scored = model / "evaluate_val.json"
            if not (a.resume and scored.is_file()):
                cmd = [py, "-m", "training", "exudates", "--data", a.data, "--out", str(model), "--backbone", backbone,
                       "--loss", loss, "--scale", str(a.scale), "--samples-per-epoch", str(a.samples_per_epoch),
                       "--device", a.device, "--patience", "1000", "--val-images", *a.val_images]
                cmd += ["--minutes", str(a.minutes)] if a.minutes else ["--epochs", str(a.epochs)]
                if a.resume and (model / "run" / "checkpoints" / "last.pt").is_file():  # a run cut before its first epoch starts over
                    cmd.append("--resume")
                run(cmd)
                run([py, "-m", "napari_retina.cli", "evaluate", "ex", "--data", a.data, "--model", str(model),
                     "--split", "val", "--device", "cuda" if a.device.startswith("cuda") else "cpu", "--out", str(scored)],
                    quiet=True)  # the JSON goes to --out
            r = json.loads(scored.read_text())
            cfg = json.loads((model / "config.json").read_text())
            rows.append((backbone, loss, cfg["training"].get("best_epoch", cfg["training"]["epochs"]), cfg["training"]["minutes"],
                         cfg["training"].get("precision", "float32"), r))
    budget = f"{a.minutes} min" if a.minutes else f"{a.epochs} epochs"
    print(f"\nhard-exudate ablation, validation images ({len(a.val_images)}), full resolution; budget per run: {budget}")
    print("| backbone | loss | best epoch | minutes to it | precision | AUPR | F1 | IoU | lesion sensitivity | FP lesions / image "
          "| FROC score |")
    print("|---|---|---|---|---|---|---|---|---|---|---|")
    for backbone, loss, ep, mins, prec, r in rows:
        lv = r["lesion_level"]
        print(f"| {backbone} | {loss} | {ep} | {mins:.0f} | {prec} | {r['aupr']:.3f} | {r['f1']:.3f} | {r['iou']:.3f} | "
              f"{lv['lesion_sensitivity']:.3f} | {lv['fp_per_image']:.0f} | {r['froc_score']:.3f} |")
    print(f"\nmachine: {platform.machine()}, command: .venv/bin/python benchmarks/exudate_ablation.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
