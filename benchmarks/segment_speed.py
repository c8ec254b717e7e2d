"""Seconds to segment one full fundus photograph (the shipped IDRiD sample, 4288 x 2848) on the machine it runs on.

    .venv/bin/python benchmarks/segment_speed.py [--model DIR | --backbone unet --scale 0.5] [--runs 3] [--threads N]
    .venv/bin/python benchmarks/segment_speed.py --lesion MA [--model DIR | --backbone resunet --base-channels 8] [--runs 3]

What `napari-retina segment` and "Find exudates" do per image: field of view, resize to the
working scale, standardise, tiled network over the field of view, map back to full size.
Speed does not depend on the weights, so `--backbone` times an untrained network of the
default size when no model folder is given. Prints each run, the median, the machine and
the command. Targets on 2 CPU cores: exudates at most 20 s (aim 10 s); microaneurysms (`--lesion
MA`: contrast enhancement, two HGNs at full and half scale, fusion, the PRN on every candidate
region; untrained, the map has many candidates, so the PRN's share is an upper bound) at most
30 s (aim 15 s). Pause other work on the machine while measuring. The networks run in
bfloat16 where the CPU computes it natively; NAPARI_RETINA_FLOAT32=1 times float32.
"""

from __future__ import annotations

import argparse
import json
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--model", help="segmentation model folder")
    p.add_argument("--backbone", default="unet", help="untrained network to time when no --model (default unet)")
    p.add_argument("--base-channels", type=int, default=16)
    p.add_argument("--scale", type=float, default=0.5, help="working scale of the untrained network (default 0.5)")
    p.add_argument("--runs", type=int, default=3)
    p.add_argument("--threads", type=int, default=None, help="torch threads (default: torch's own, the CPU count)")
    p.add_argument("--lesion", choices=("EX", "MA"), default="EX")
    a = p.parse_args()

    import torch

    from napari_retina.fundus import field_of_view_mask
    from napari_retina.io.images import read_fundus
    from napari_retina.models.precision import inference_dtype
    from napari_retina.models.registry import load_model
    from napari_retina.sample_data import idrid_sample_path

    if a.threads:
        torch.set_num_threads(a.threads)
    if a.model:
        seg = load_model(a.model)
    elif a.lesion == "MA":
        from napari_retina.models.microaneurysms import MicroaneurysmDetector
        from napari_retina.nets.patch_classifier import PatchClassifier
        from napari_retina.nets.segmentation import SegmentationNet

        backbone = a.backbone if a.backbone != "unet" else "resunet"
        nets = [SegmentationNet(backbone=backbone, base_channels=a.base_channels) for _ in range(2)]
        part = {"tile": 512, "overlap": 128, "threshold": 0.5, "lesion": "MA"}
        cfg = {"model": "microaneurysms", "lesion": "MA", "version": f"untrained-{backbone}{a.base_channels}",
               "hgn_full": {**part, "input_scale": 1.0, "net": nets[0].config()},
               "hgn_half": {**part, "input_scale": 0.5, "net": nets[1].config()},
               "prn": {"net": PatchClassifier().config()}, "threshold": 0.5, "candidate_threshold": 0.5}
        seg = MicroaneurysmDetector.from_networks(nets[0], nets[1], PatchClassifier(), cfg)
    else:
        from napari_retina.models.folder import write_model_folder
        from napari_retina.nets.segmentation import SegmentationNet

        net = SegmentationNet(backbone=a.backbone, base_channels=a.base_channels)
        cfg = {"model": "exudates", "lesion": "EX", "version": f"untrained-{a.backbone}", "net": net.config(),
               "input_scale": a.scale, "tile": 512, "overlap": 128, "threshold": 0.5}
        folder = write_model_folder(Path(tempfile.mkdtemp()) / "m", net.state_dict(), cfg, "timing {sha256}")
        seg = load_model(folder)
    rgb = read_fundus(idrid_sample_path())
    times, fov_s = [], []
    for _ in range(a.runs):
        t0 = time.perf_counter()
        fov = field_of_view_mask(rgb)
        t1 = time.perf_counter()
        seg.segment(rgb, fov)
        times.append(time.perf_counter() - t0)
        fov_s.append(t1 - t0)
        print(f"run {len(times)}: {times[-1]:.1f} s (field of view {fov_s[-1]:.1f} s)", flush=True)
    result = {
        "image": f"{idrid_sample_path().name} {rgb.shape[1]}x{rgb.shape[0]}",
        "model": seg.description,
        "backbone": seg.config["net"]["backbone"] if "net" in seg.config else seg.config["hgn_full"]["net"]["backbone"],
        "input_scale": seg.scale,
        "precision": inference_dtype(getattr(seg, "device", "cpu")),
        "median_s": round(float(np.median(times)), 2),
        "runs_s": [round(t, 2) for t in times],
        "machine": f"{platform.processor() or platform.machine()}, {os.cpu_count()} CPUs, torch threads {torch.get_num_threads()}",
        "command": ".venv/bin/python benchmarks/segment_speed.py " + " ".join(sys.argv[1:]),
    }
    print(json.dumps(result, indent=1))
    target, aim = (30, 15) if a.lesion == "MA" else (20, 10)
    print(f"median {result['median_s']} s per image: {'meets' if result['median_s'] <= target else 'misses'} the "
          f"{target} s target ({'meets' if result['median_s'] <= aim else 'misses'} the {aim} s aim)")
    return 0


if __name__ == "__main__":
    sys.exit(main())
