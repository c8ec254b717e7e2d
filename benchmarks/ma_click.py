"""How well does one click with the microaneurysm tool match a grader's microaneurysm mask?

    .venv/bin/python benchmarks/ma_click.py --data IDRID_TRAIN [--images 6] [--per-image 25] [--offset 3 -2]

For microaneurysms drawn at random from the first `--images` images with MA masks (IDRiD layout),
a click `--offset` px (rows, columns) off each lesion's centre of mass goes through
`snap_microaneurysm` (dark centre, disc radius from the image); prints the mean and median IoU
of the disc against that lesion's mask, the fraction with IoU >= 0.5, and the command.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

import numpy as np


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True)
    p.add_argument("--images", type=int, default=6)
    p.add_argument("--per-image", type=int, default=25)
    p.add_argument("--offset", type=int, nargs=2, default=[3, -2])
    p.add_argument("--seed", type=int, default=0)
    a = p.parse_args()
    from scipy import ndimage

    from napari_retina.io.datasets import open_dataset
    from napari_retina.io.images import read_fundus
    from napari_retina.metrics import label_lesions
    from napari_retina.models.microaneurysms import disc_box, snap_microaneurysm
    from napari_retina.session import graders_mask

    ds = open_dataset(Path(a.data))
    if ds is None:
        print(f"{a.data}: no fundus images", file=sys.stderr)
        return 2
    ious, used = [], 0
    for rec in ds.records:
        if used >= a.images:
            break
        rgb = read_fundus(rec.image)
        ma = graders_mask(rec, "MA", rgb.shape[:2])
        if ma is None:
            continue
        lab, n = label_lesions(ma)
        if n == 0:
            continue
        used += 1
        rng = np.random.default_rng(a.seed)
        for k in rng.choice(np.arange(1, n + 1), min(n, a.per_image), replace=False):
            cy, cx = (int(v) for v in ndimage.center_of_mass(ma, lab, int(k)))
            point = (min(max(cy + a.offset[0], 0), ma.shape[0] - 1), min(max(cx + a.offset[1], 0), ma.shape[1] - 1))
            centre, radius = snap_microaneurysm(rgb, point)
            box, disc = disc_box(centre, radius, ma.shape)
            d = np.zeros(ma.shape, bool)
            d[box[0] : box[1], box[2] : box[3]] = disc
            sl = (slice(max(0, cy - 60), cy + 60), slice(max(0, cx - 60), cx + 60))
            gt, dd = lab[sl] == k, d[sl]
            ious.append((gt & dd).sum() / max((gt | dd).sum(), 1))
    ious = np.array(ious)
    print(f"{len(ious)} microaneurysms in {used} images, click offset {tuple(a.offset)} px: "
          f"IoU mean {ious.mean():.3f}, median {np.median(ious):.3f}, >= 0.5 for {100 * (ious >= 0.5).mean():.0f} %")
    print("command: .venv/bin/python benchmarks/ma_click.py " + " ".join(sys.argv[1:]))
    return 0


if __name__ == "__main__":
    sys.exit(main())
