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
    "PixelPR",
    "LesionFROC",
    "label_lesions",
    "match_lesions",
    "lesion_counts",
    "summarise_lesion_counts",
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


# ---- probability maps: pixel-level precision-recall, pooled over images ------------------------------

PR_BINS = 256  # probability maps are stored as uint8 0-255: one bin per stored value


def _prob_to_bins(prob, bins: int) -> np.ndarray:
    """Levels 0 .. bins-1 of a map: round(p * (bins - 1)), i.e. the uint8 a `_prob.tif` stores."""
    p = np.asarray(prob)
    if p.dtype == np.uint8 and bins == 256:
        return p
    p = np.clip(np.asarray(p, dtype=np.float64), 0.0, 1.0)
    return np.round(p * (bins - 1)).astype(np.int64)


def level_threshold(threshold: float, bins: int = PR_BINS) -> int:
    """The lowest stored level (0 .. bins-1) that is lesion at probability `threshold`."""
    return int(min(bins, max(0, math.ceil(threshold * (bins - 1) - 1e-9))))


class PixelPR:
    """Pixel-level precision-recall over many images, from two histograms of probabilities.

    The IDRiD challenge scores segmentation by the area under the pixel-level precision-recall
    curve pooled over every pixel of the test split (about 300 million for 54 images): a
    sort is out of the question, so each image adds to a histogram of the probabilities of its
    lesion and background pixels (`bins` = 256: the uint8 levels round(255 p) a probability
    map is stored in; floats are binned the same way). Threshold k keeps levels >= k.
    `region` (e.g. the field of view) restricts which pixels count.
    """

    def __init__(self, bins: int = PR_BINS):
        self.bins = int(bins)
        self.pos = np.zeros(self.bins, np.int64)  # lesion pixels per probability bin
        self.neg = np.zeros(self.bins, np.int64)  # background pixels per probability bin
        self.images = 0

    def add(self, prob, gt, region=None) -> None:
        b = _prob_to_bins(prob, self.bins)
        g = np.asarray(gt, dtype=bool)
        if b.shape != g.shape:
            raise ValueError(f"probability shape {b.shape} differs from ground-truth shape {g.shape}")
        if region is not None:
            r = np.asarray(region, dtype=bool)
            b, g = b[r], g[r]
        self.pos += np.bincount(b[g].ravel(), minlength=self.bins)
        self.neg += np.bincount(b[~g].ravel(), minlength=self.bins)
        self.images += 1

    def counts(self, k: int) -> tuple[int, int, int, int]:
        """(tp, fp, fn, tn) when pixels in bins >= k are predicted lesion."""
        tp, fp = int(self.pos[k:].sum()), int(self.neg[k:].sum())
        return tp, fp, int(self.pos.sum()) - tp, int(self.neg.sum()) - fp

    def bin_of(self, threshold: float) -> int:
        """The lowest level counted as lesion at `threshold`: ceil(t (bins - 1)); 0.5 -> 128 of 0..255.

        The one rule by which a stored map and its mask agree (`level_threshold`)."""
        return level_threshold(threshold, self.bins)

    def curve(self) -> tuple[np.ndarray, np.ndarray]:
        """(precision, recall) at thresholds k = bins-1 ... 0 (recall rising); empty bins merged."""
        tp = np.cumsum(self.pos[::-1])
        fp = np.cumsum(self.neg[::-1])
        keep = (self.pos[::-1] + self.neg[::-1]) > 0
        tp, fp = tp[keep], fp[keep]
        total = int(self.pos.sum())
        precision = tp / np.maximum(tp + fp, 1)
        recall = tp / total if total else np.zeros_like(tp, dtype=float)
        return precision, recall

    def aupr(self) -> float:
        """Area under the precision-recall curve: sum over thresholds of (R_k - R_k+1) * P_k.

        The step-wise sum (scikit-learn's average precision) rather than the trapezoid, which
        is optimistic between distant points; nan when no pixel of the lesion was seen.
        """
        if self.pos.sum() == 0:
            return math.nan
        precision, recall = self.curve()
        steps = np.diff(np.concatenate([[0.0], recall]))
        return float(np.sum(steps * precision))

    def at_threshold(self, threshold: float) -> dict:
        """Pixel-level figures at a probability threshold (the pooled confusion matrix)."""
        tp, fp, fn, tn = self.counts(self.bin_of(threshold))

        def ratio(a, b):
            return a / b if b else math.nan

        return {
            "precision": ratio(tp, tp + fp),
            "recall": ratio(tp, tp + fn),
            "sensitivity": ratio(tp, tp + fn),
            "specificity": ratio(tn, tn + fp),
            "f1": ratio(2 * tp, 2 * tp + fp + fn),
            "iou": ratio(tp, tp + fp + fn),
        }


# ---- lesion level: connected lesions (8-connectivity), matched by touching -----------------------

EIGHT = np.ones((3, 3), bool)  # 8-connectivity, everywhere in napari-retina
FROC_RATES = (0.125, 0.25, 0.5, 1.0, 2.0, 4.0, 8.0)  # false positives per image


def label_lesions(mask) -> tuple[np.ndarray, int]:
    """(labels, count) of the connected lesions of a binary mask, 8-connectivity."""
    from scipy import ndimage

    return ndimage.label(np.asarray(mask, dtype=bool), structure=EIGHT)


def match_lesions(pred_labels: np.ndarray, gt_labels: np.ndarray) -> list[set[int]]:
    """For each predicted lesion 1..n, the ground-truth lesions it touches (shares a pixel with).

    The one lesion-level rule: a predicted lesion is a true positive when the set is not
    empty, a false positive otherwise; a ground-truth lesion is found when some kept
    prediction touches it.
    """
    n = int(pred_labels.max()) if pred_labels.size else 0
    out: list[set[int]] = [set() for _ in range(n)]
    both = (pred_labels > 0) & (gt_labels > 0)
    if both.any():
        pairs = np.unique(np.stack([pred_labels[both], gt_labels[both]]), axis=1)
        for p, g in pairs.T:
            out[int(p) - 1].add(int(g))
    return out


class LesionFROC:
    """Lesion-level detection over many images: free-response ROC (sensitivity vs FP per image).

    Each image's candidates are the connected lesions (8-connectivity) of its probability map
    above `candidate_threshold`, each scored by its highest probability; sweeping a score
    threshold over all candidates gives sensitivity (ground-truth lesions touched by a kept
    candidate / all ground-truth lesions) against false positives (kept candidates touching
    none) per image. Candidates with the same highest probability are ranked by their mean
    probability: a confident model saturates (many candidates at 1.0, or at 255 in a stored
    uint8 map), and tied candidates entering together would make the low-FP points meaningless.
    """

    def __init__(self, candidate_threshold: float = 0.1):
        self.candidate_threshold = float(candidate_threshold)
        self.scores: list[np.ndarray] = []  # per image: candidate scores (highest probability)
        self.means: list[np.ndarray] = []  # per image: candidates' mean probability (breaks ties)
        self.touches: list[list[set[int]]] = []  # per image: gt lesions each candidate touches
        self.n_gt: list[int] = []

    def add(self, prob, gt, region=None) -> None:
        from scipy import ndimage

        p = np.asarray(prob)
        p = p.astype(np.float32) / 255.0 if p.dtype == np.uint8 else p.astype(np.float32)
        g = np.asarray(gt, dtype=bool)
        if p.shape != g.shape:
            raise ValueError(f"probability shape {p.shape} differs from ground-truth shape {g.shape}")
        cand = p >= self.candidate_threshold
        if region is not None:
            cand &= np.asarray(region, dtype=bool)
        cand_labels, n = label_lesions(cand)
        gt_labels, n_gt = label_lesions(g)
        index = np.arange(1, n + 1)
        scores = np.asarray(ndimage.maximum(p, cand_labels, index=index), np.float32).reshape(-1) if n else np.zeros(0, np.float32)
        means = np.asarray(ndimage.mean(p, cand_labels, index=index), np.float64).reshape(-1) if n else np.zeros(0)
        self.scores.append(scores)
        self.means.append(means)
        self.touches.append(match_lesions(cand_labels, gt_labels))
        self.n_gt.append(int(n_gt))

    def curve(self) -> tuple[np.ndarray, np.ndarray, np.ndarray]:
        """(score thresholds, FP per image, sensitivity), one point per distinct (score, mean), falling."""
        images = len(self.scores)
        total_gt = sum(self.n_gt)
        entries = [(float(s), float(self.means[i][k]), i, k) for i, sc in enumerate(self.scores) for k, s in enumerate(sc)]
        entries.sort(key=lambda e: (-e[0], -e[1]))
        found: set[tuple[int, int]] = set()
        fp = 0
        th, fps, sens = [], [], []
        for j, (s, m, i, k) in enumerate(entries):
            t = self.touches[i][k]
            if t:
                found.update((i, g) for g in t)
            else:
                fp += 1
            if j + 1 == len(entries) or entries[j + 1][:2] != (s, m):  # full ties enter together
                th.append(s)
                fps.append(fp / max(images, 1))
                sens.append(len(found) / total_gt if total_gt else math.nan)
        return np.array(th), np.array(fps), np.array(sens)

    def points(self, rates=FROC_RATES) -> dict[str, float]:
        """Sensitivity at each FP-per-image rate: the best point with at most that many FPs."""
        _, fps, sens = self.curve()
        out = {}
        for r in rates:
            ok = fps <= r + 1e-12
            out[f"{r:g}"] = float(sens[ok].max()) if ok.any() else 0.0
        return out

    def score(self, rates=FROC_RATES) -> float:
        """The mean sensitivity over the FP rates (the usual single FROC figure)."""
        return float(np.mean(list(self.points(rates).values())))


def lesion_counts(pred, gt) -> tuple[int, int, int, int]:
    """(tp, fp, found, n_gt) of one image: predicted lesions touching / not touching a
    ground-truth lesion, ground-truth lesions touched, ground-truth lesions (8-connectivity)."""
    p, g = _pair(pred, gt)
    pl, _ = label_lesions(p)
    gl, n_gt = label_lesions(g)
    touches = match_lesions(pl, gl)
    tp = sum(1 for t in touches if t)
    found = len(set().union(*touches)) if touches else 0
    return tp, len(touches) - tp, found, int(n_gt)


def summarise_lesion_counts(per_image: Iterable[tuple[int, int, int, int]]) -> dict:
    """Lesion-level precision and sensitivity pooled over images and averaged per image, FP per image."""
    rows = [tuple(int(v) for v in r) for r in per_image]

    def ratio(a, b):
        return a / b if b else math.nan

    tp, fp, found, n_gt = (sum(r[i] for r in rows) for i in range(4)) if rows else (0, 0, 0, 0)
    prec_i = [ratio(r[0], r[0] + r[1]) for r in rows]
    sens_i = [ratio(r[2], r[3]) for r in rows]

    def mean(v):
        v = [x for x in v if not math.isnan(x)]
        return float(np.mean(v)) if v else math.nan

    return {
        "lesion_precision": ratio(tp, tp + fp),
        "lesion_sensitivity": ratio(found, n_gt),
        "fp_per_image": ratio(fp, len(rows)),
        "lesion_precision_per_image": mean(prec_i),
        "lesion_sensitivity_per_image": mean(sens_i),
    }
