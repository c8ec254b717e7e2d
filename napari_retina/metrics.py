"""The one definition of the segmentation metrics used by the CLI, the benchmarks and training.

All functions take boolean masks of the same shape (anything `np.asarray(..., bool)` accepts).
Convention for empty masks: an image where neither the prediction nor the ground truth has
the lesion says nothing about the lesion, so `iou` and `dice` return nan for it and
`image_level_iou` skips it (the paper's image-level average counts only images that have
the lesion, or where the model wrongly predicts it: IoU 0 there).
`pooled_iou` sums intersections and unions over regions (e.g. the pixels inside each
ellipse) before dividing.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import numpy as np

__all__ = [
    "iou",
    "dice",
    "precision_recall_f1",
    "image_level_iou",
    "summarise_image_ious",
    "overlap_counts",
    "pooled_iou",
]


def _pair(pred, gt) -> tuple[np.ndarray, np.ndarray]:
    p = np.asarray(pred, dtype=bool)
    g = np.asarray(gt, dtype=bool)
    if p.shape != g.shape:
        raise ValueError(f"prediction shape {p.shape} differs from ground-truth shape {g.shape}")
    return p, g


def _counts(pred, gt) -> tuple[int, int, int]:
    """(true positives, false positives, false negatives) in pixels."""
    p, g = _pair(pred, gt)
    tp = int(np.count_nonzero(p & g))
    return tp, int(np.count_nonzero(p)) - tp, int(np.count_nonzero(g)) - tp


def iou(pred, gt) -> float:
    """|pred & gt| / |pred | gt|; nan when both masks are empty (the image does not count)."""
    tp, fp, fn = _counts(pred, gt)
    union = tp + fp + fn
    return tp / union if union else math.nan


def dice(pred, gt) -> float:
    """2 |pred & gt| / (|pred| + |gt|); nan when both masks are empty, like `iou`."""
    tp, fp, fn = _counts(pred, gt)
    total = 2 * tp + fp + fn
    return 2 * tp / total if total else math.nan


def precision_recall_f1(pred, gt) -> tuple[float, float, float]:
    """Pixel-level (precision, recall, F1); a ratio whose denominator is 0 is nan.

    precision = tp / |pred| (nan for an empty prediction), recall = tp / |gt| (nan for an
    empty ground truth), F1 = 2 tp / (|pred| + |gt|) (nan when both are empty; 0 when only
    one is), which equals the harmonic mean of precision and recall whenever both exist.
    """
    tp, fp, fn = _counts(pred, gt)
    p = tp / (tp + fp) if tp + fp else math.nan
    r = tp / (tp + fn) if tp + fn else math.nan
    f1 = 2 * tp / (2 * tp + fp + fn) if tp + fp + fn else math.nan
    return p, r, f1


def summarise_image_ious(values: Iterable[float]) -> tuple[float, float, int]:
    """(mean, population std, images counted) of per-image `iou` values, skipping nan.

    The one image-level average: `image_level_iou` and the evaluation both go through it.
    Mean and std are nan when no image counts.
    """
    vals = np.array(list(values), dtype=float)
    vals = vals[~np.isnan(vals)]
    if vals.size == 0:
        return math.nan, math.nan, 0
    return float(vals.mean()), float(np.std(vals)), int(vals.size)


def image_level_iou(pairs: Iterable[tuple[object, object]]) -> tuple[float, float]:
    """(mean, population std) of `iou` over (pred, gt) pairs, one per image, skipping nan.

    Both are nan when no image counts.
    """
    mean, std, _ = summarise_image_ious(iou(p, g) for p, g in pairs)
    return mean, std


def overlap_counts(pred, gt, region=None) -> tuple[int, int]:
    """(|pred & gt|, |pred | gt|) in pixels, counted only inside `region` when it is given."""
    p, g = _pair(pred, gt)
    if region is not None:
        r = np.asarray(region, dtype=bool)
        if r.shape != p.shape:
            raise ValueError(f"region shape {r.shape} differs from mask shape {p.shape}")
        p, g = p & r, g & r
    return int(np.count_nonzero(p & g)), int(np.count_nonzero(p | g))


def pooled_iou(counts: Iterable[tuple[int, int]]) -> float:
    """Sum of intersections / sum of unions over (intersection, union) pairs such as `overlap_counts`.

    Large regions weigh more than small ones (unlike a mean of per-region IoUs); nan when
    the unions sum to 0, like `iou` of two empty masks.
    """
    inter = union = 0
    for i, u in counts:
        inter += int(i)
        union += int(u)
    return inter / union if union else math.nan
