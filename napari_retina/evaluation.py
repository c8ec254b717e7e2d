"""`napari-retina evaluate refine`: the one evaluation of ellipse refinement (paper Table 1).

For each image of the split and each lesion it has: simulate coarse ellipses
from the fine mask, refine them with each model variant, and score the image
level IoU; figures are the mean and std over images, per lesion and on average.
"""

from __future__ import annotations

import statistics
import time
from pathlib import Path

import numpy as np

from .io.datasets import ImageRecord, open_dataset
from .io.errors import RetinaInputError
from .io.images import read_fundus
from .io.masks import read_mask

REFINE_LESIONS = ("MA", "SE", "EX", "HE")


def _records(data: Path, split: str, validation_images: list[str] | None) -> list[ImageRecord]:
    ds = open_dataset(data)
    if ds is None:
        raise RetinaInputError(f"{data}: no fundus images found")
    records = ds.records
    if split == "val":
        if not validation_images:
            raise RetinaInputError("the model card names no validation images; use --split all")
        wanted = {Path(n).stem for n in validation_images}
        records = [r for r in records if r.stem in wanted]
        if not records:
            raise RetinaInputError(f"{data}: none of the model's validation images are here")
    return records


def _summary(values: list[float]) -> dict:
    vals = [v for v in values if not np.isnan(v)]
    if not vals:
        return {"mean": None, "std": None, "images": 0}
    return {
        "mean": round(100 * float(np.mean(vals)), 2),
        "std": round(100 * float(np.std(vals)), 2),
        "images": len(vals),
    }


def evaluate_refine(
    data: str | Path,
    model_dir: str | Path | None = None,
    baseline_dir: str | Path | None = None,
    reduction: float = 1.0,
    split: str = "all",
    seed: int = 0,
    lesions: tuple[str, ...] = REFINE_LESIONS,
    latency_samples: int = 100,
    limit: int | None = None,
    progress=None,
) -> dict:
    from .coarse import coarse_mask, simulate_coarse_ellipses
    from .metrics import iou
    from .models.refiner import EllipseRefiner

    refiner = EllipseRefiner(model_dir)
    baseline = EllipseRefiner(baseline_dir) if baseline_dir else None
    records = _records(Path(data), split, refiner.config.get("validation_images"))
    if limit:
        records = records[:limit]
    methods = ["initial", "prototype", "prototype_superpixels"] + (["baseline"] if baseline else [])
    scores = {m: {c: [] for c in lesions} for m in methods}
    latencies: list[float] = []
    n_ellipses = {c: 0 for c in lesions}
    for k, rec in enumerate(records):
        rgb = read_fundus(rec.image)
        for code in lesions:
            if code not in rec.masks:
                continue
            gt = read_mask(rec.masks[code], expected_shape=rgb.shape[:2])
            if not gt.any():
                continue
            ellipses = simulate_coarse_ellipses(gt, code, reduction=reduction, seed=seed + k)
            n_ellipses[code] += len(ellipses)
            scores["initial"][code].append(iou(coarse_mask(ellipses, gt.shape, code), gt))
            scores["prototype"][code].append(iou(refiner.refine_mask(rgb, ellipses, superpixels=False), gt))
            scores["prototype_superpixels"][code].append(iou(refiner.refine_mask(rgb, ellipses, superpixels=True), gt))
            if baseline:
                scores["baseline"][code].append(iou(baseline.refine_mask(rgb, ellipses), gt))
            # latency as the annotator sees it: one ellipse at a time, the shipped setting,
            # a few ellipses of every image and lesion so that sizes vary
            for e in ellipses[:3]:
                if len(latencies) < latency_samples:
                    t0 = time.perf_counter()
                    refiner.refine_each(rgb, [e])
                    latencies.append(time.perf_counter() - t0)
        if progress:
            progress(k + 1, len(records), rec.stem)
    results = {}
    for m in methods:
        per = {c: _summary(scores[m][c]) for c in lesions}
        means = [v["mean"] for v in per.values() if v["mean"] is not None]
        stds = [v["std"] for v in per.values() if v["std"] is not None]
        per["average"] = {
            "mean": round(statistics.fmean(means), 2) if means else None,
            "std": round(statistics.fmean(stds), 2) if stds else None,
        }
        results[m] = per
    lat_ms = np.array(latencies) * 1000
    return {
        "data": str(data),
        "split": split,
        "images": [r.stem for r in records],
        "reduction": reduction,
        "seed": seed,
        "ellipses": n_ellipses,
        "model": refiner.description | {"superpixels_default": bool(refiner.superpixels)},
        "baseline": baseline.description if baseline else None,
        "iou_percent": results,
        "latency_ms_per_ellipse": {
            "median": round(float(np.median(lat_ms)), 1) if len(lat_ms) else None,
            "p95": round(float(np.percentile(lat_ms, 95)), 1) if len(lat_ms) else None,
            "n": int(len(lat_ms)),
            "device": "cpu",
        },
    }
