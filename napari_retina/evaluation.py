"""`napari-retina evaluate refine`: the one evaluation of ellipse refinement (paper Table 1 and Fig. 3).

For each image of the split and each lesion the model refines: simulate coarse ellipses
from the fine mask (seed `seed + k`, k the image's index in the split), refine them with
each method, and score the prediction against the fine mask twice:

- image-level IoU (`metrics.iou`, summarised by `metrics.summarise_image_ious`): mean and
  population std over images, per lesion, and their plain average over lesions. An image
  counts when its mask or the prediction has the lesion (a prediction on an image without
  the lesion scores 0); an image where neither has it is skipped.
- IoU inside each ellipse, pooled by ellipse size (`metrics.pooled_iou`): the sum over the
  ellipses of a size bucket of |pred & gt & ellipse| / the sum of |(pred | gt) & ellipse|,
  per lesion and over all lesions. Buckets by semi-major axis: `lt_32` (< 32 px),
  `32_128` (32 to 128 px, both included), `gt_128` (> 128 px).

Methods: `initial` (the coarse ellipses themselves), `model` (the model as it ships: its own
threshold and superpixel setting), `prototype` / `prototype_superpixels` (the model with the
superpixel weighting forced off / on), `baseline` (a second model folder, its own setting).

The JSON document (keys stable; percentages rounded to 2 decimals; null where nothing counts):

    data, split, images (stems), reduction, seed, model, baseline
    ellipses/<lesion>                                    ellipses simulated at `reduction`
    iou_percent/<variant>/<lesion>/{mean,std,images}     Table 1 at `reduction`;
    iou_percent/<variant>/average/{mean,std}             variant: initial, prototype,
                                                         prototype_superpixels, baseline
    reductions                                           e.g. [1.0, 1.5, 2.0] ([] when skipped)
    by_reduction/<r>/<method>/<lesion>/{mean,std,images} Fig. 3: <r> as "1.0", "1.5", "2.0";
    by_reduction/<r>/<method>/average/{mean,std}         method: initial, model, baseline
    size_buckets/<bucket>                                the bucket's rule in words
    by_size/<r>/<method>/<bucket>/<lesion or all>/{iou,ellipses}
                                                         pooled IoU inside the ellipses, their count
    latency_ms_per_ellipse/{median,p95,n,device}

for example `by_reduction/1.5/model/average/mean`: 32.12 and
`by_size/1.0/initial/gt_128/all`: {"iou": 29.1, "ellipses": 81}.

`score_refinement` runs the same scoring on images held in memory with a model held in
memory (the training recipe's early stopping uses it every epoch), so its figures equal
this command's on the same images; given candidate thresholds it also scores each
probability map at every one of them (`by_threshold`, not part of the command's JSON).
"""

from __future__ import annotations

import math
import statistics
import time
from collections.abc import Callable, Iterable, Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io.datasets import ImageRecord, open_dataset
from .io.ellipses import Ellipse, ellipse_bbox, rasterize_ellipse
from .io.errors import RetinaInputError
from .io.images import read_fundus
from .io.masks import read_mask
from .lesions import REFINED_LESIONS, lesion as _lesion
from .metrics import iou, overlap_counts, pooled_iou, summarise_image_ious

__all__ = [
    "DEFAULT_REDUCTIONS",
    "METHODS",
    "SIZE_BUCKETS",
    "evaluate_refine",
    "score_refinement",
    "score_refinement_runs",
    "size_bucket",
    "ellipse_regions",
    "ellipse_overlaps",
    "refined_lesions",
    "reduction_key",
    "threshold_key",
]

DEFAULT_REDUCTIONS: tuple[float, ...] = (1.0, 1.5, 2.0)
METHODS: tuple[str, ...] = ("initial", "model", "prototype", "prototype_superpixels", "baseline")
TABLE_METHODS: tuple[str, ...] = ("initial", "prototype", "prototype_superpixels")  # + baseline: Table 1
FIGURE_METHODS: tuple[str, ...] = ("initial", "model")  # + baseline: Fig. 3 and the size buckets
# the refiner's own methods and their superpixel setting ("model": the refiner's setting)
_REFINER_VARIANTS: dict[str, bool | None] = {"model": None, "prototype": False, "prototype_superpixels": True}
SIZE_BUCKETS: dict[str, str] = {
    "lt_32": "semi-major axis < 32 px",
    "32_128": "32 px <= semi-major axis <= 128 px",
    "gt_128": "semi-major axis > 128 px",
}

# (stem, rgb (H, W, 3), {lesion code: fine (H, W) mask}); a lesion without a mask is absent
ScoredImage = tuple[str, np.ndarray, Mapping[str, np.ndarray]]


def reduction_key(reduction: float) -> str:
    """The JSON key of a reduction factor: "1.0", "1.5", "2.0"."""
    return str(float(reduction))


def threshold_key(threshold: float) -> str:
    """The key of a probability threshold in "by_threshold": "0.5", "0.55" (no float noise)."""
    return str(round(float(threshold), 6))


def size_bucket(ellipse: Ellipse) -> str:
    """The size bucket (a key of SIZE_BUCKETS) of an ellipse, by its semi-major axis in pixels."""
    a = max(ellipse.semi_axes)
    if a < 32:
        return "lt_32"
    return "32_128" if a <= 128 else "gt_128"


def refined_lesions(refiner) -> tuple[str, ...]:
    """The lesions a model refines: its config.json's "lesions", else lesions.REFINED_LESIONS."""
    config = getattr(refiner, "config", None) or {}
    return tuple(_lesion(c).code for c in (config.get("lesions") or REFINED_LESIONS))


@dataclass(frozen=True)
class EllipseRegion:
    """The pixels of one ellipse (as `rasterize_ellipse` marks them), kept on the ellipse's box."""

    bucket: str
    rows: slice
    cols: slice
    inside: np.ndarray  # bool (rows, cols)


def ellipse_regions(ellipses: Iterable[Ellipse], shape: Sequence[int]) -> list[EllipseRegion]:
    """One region per ellipse, clipped to an image of `shape`; rasterised once, used for every method."""
    out = []
    for e in ellipses:
        r0, r1, c0, c1 = ellipse_bbox(e, shape=shape)
        # the same ellipse with the box origin at (0, 0): full-image masks per ellipse would cost H x W each
        local = Ellipse(e.lesion, (e.center_xy[0] - c0, e.center_xy[1] - r0), e.semi_axes, e.angle_deg)
        out.append(EllipseRegion(size_bucket(e), slice(r0, r1), slice(c0, c1), rasterize_ellipse(local, (r1 - r0, c1 - c0))))
    return out


def ellipse_overlaps(pred: np.ndarray, gt: np.ndarray, regions: Iterable[EllipseRegion]) -> list[tuple[str, int, int]]:
    """(bucket, |pred & gt & ellipse|, |(pred | gt) & ellipse|) per ellipse region, in pixels."""
    return [(r.bucket, *overlap_counts(pred[r.rows, r.cols], gt[r.rows, r.cols], r.inside)) for r in regions]


def _percent(x: float) -> float | None:
    return None if math.isnan(x) else round(100 * x, 2)


class _Tally:
    """Per-image IoUs and per-ellipse overlaps of one reduction, summarised into the JSON tables."""

    def __init__(self, methods: Sequence[str], lesions: Sequence[str], thresholds: Sequence[float] = ()):
        self.methods = tuple(methods)
        self.lesions = tuple(lesions)
        self.image_ious = {m: {c: [] for c in lesions} for m in methods}
        self.overlaps = {m: {b: {c: [] for c in lesions} for b in SIZE_BUCKETS} for m in methods}
        self.ellipses = {c: 0 for c in lesions}
        self.swept = tuple(m for m in self.methods if m in _REFINER_VARIANTS) if thresholds else ()
        self.threshold_ious = {t: {m: {c: [] for c in lesions} for m in self.swept} for t in thresholds}

    def add(self, method: str, code: str, image_iou: float, overlaps: list[tuple[str, int, int]]) -> None:
        self.image_ious[method][code].append(image_iou)
        for bucket, inter, union in overlaps:
            self.overlaps[method][bucket][code].append((inter, union))

    def _iou_table(self, method: str, image_ious: Mapping[str, list[float]] | None = None) -> dict:
        image_ious = self.image_ious[method] if image_ious is None else image_ious
        per = {}
        for c in self.lesions:
            mean, std, n = summarise_image_ious(image_ious[c])
            per[c] = {"mean": _percent(mean), "std": _percent(std), "images": n}
        means = [v["mean"] for v in per.values() if v["mean"] is not None]
        stds = [v["std"] for v in per.values() if v["std"] is not None]
        per["average"] = {
            "mean": round(statistics.fmean(means), 2) if means else None,
            "std": round(statistics.fmean(stds), 2) if stds else None,
        }
        return per

    def _size_table(self, method: str) -> dict:
        table = {}
        for bucket, by_lesion in self.overlaps[method].items():
            row = {c: {"iou": _percent(pooled_iou(v)), "ellipses": len(v)} for c, v in by_lesion.items()}
            pooled = [iu for v in by_lesion.values() for iu in v]
            row["all"] = {"iou": _percent(pooled_iou(pooled)), "ellipses": len(pooled)}
            table[bucket] = row
        return table

    def result(self) -> dict:
        out = {
            "ellipses": dict(self.ellipses),
            "iou_percent": {m: self._iou_table(m) for m in self.methods},
            "by_size": {m: self._size_table(m) for m in self.methods},
        }
        if self.threshold_ious:
            out["by_threshold"] = {
                threshold_key(t): {m: self._iou_table(m, per[m]) for m in self.swept} for t, per in self.threshold_ious.items()
            }
        return out


def _prediction(method: str, refiner, baseline, rgb, ellipses, code, shape, sweep: bool) -> tuple[tuple, Callable[[], np.ndarray]]:
    """(cache key, how to compute it): `model` is the same prediction as the variant it ships as.

    With `sweep` the refiner's variants give probabilities, thresholded by the caller.
    """
    from .coarse import coarse_mask

    if method == "initial":
        return ("initial",), lambda: coarse_mask(ellipses, shape, code)
    if method == "baseline":
        return ("baseline",), lambda: baseline.refine_mask(rgb, ellipses)
    superpixels = bool(refiner.superpixels) if method == "model" else _REFINER_VARIANTS[method]
    if sweep:
        return ("refiner", superpixels), lambda: refiner.refine_probability(rgb, ellipses, superpixels=superpixels)
    return ("refiner", superpixels), lambda: refiner.refine_mask(rgb, ellipses, superpixels=superpixels)


def _ground_truth(masks: Mapping[str, np.ndarray], code: str, shape: tuple[int, int], stem: str) -> np.ndarray:
    gt = masks.get(code)
    if gt is None:
        return np.zeros(shape, bool)
    gt = np.asarray(gt, dtype=bool)
    if gt.shape != shape:
        raise ValueError(f"{stem}: the {code} mask is {gt.shape}, the image {shape}")
    return gt


def score_refinement_runs(
    refiner,
    images: Iterable[ScoredImage],
    runs: Mapping[float, Sequence[str]],
    seed: int = 0,
    lesions: Sequence[str] | None = None,
    baseline=None,
    progress: Callable[[int, str], None] | None = None,
    each_lesion: Callable[[float, np.ndarray, str, list[Ellipse]], None] | None = None,
    thresholds: Sequence[float] | None = None,
) -> dict[float, dict]:
    """Score several reductions in one pass over `images` (each image is used once, then dropped).

    `runs` maps a reduction factor to the methods scored at it. Returns, per reduction,
    {"ellipses": {lesion: n}, "iou_percent": {method: ...}, "by_size": {method: ...}} in the
    layout of the module docstring. `progress(k + 1, stem)` follows each image;
    `each_lesion(reduction, rgb, lesion, ellipses)` sees every simulated set of ellipses.
    With `thresholds` (the refiner then needs `refine_probability(rgb, ellipses, superpixels=None)`),
    each probability map is computed once and also scored at every threshold:
    "by_threshold": {threshold_key(t): {method: iou table}} for model / prototype / prototype_superpixels.
    """
    from .coarse import simulate_coarse_ellipses

    lesions = refined_lesions(refiner) if lesions is None else tuple(_lesion(c).code for c in lesions)
    for methods in runs.values():
        unknown = [m for m in methods if m not in METHODS]
        if unknown:
            raise ValueError(f"unknown method {unknown[0]!r}; expected one of {', '.join(METHODS)}")
        if "baseline" in methods and baseline is None:
            raise ValueError("method 'baseline' needs a baseline refiner")
    for r in runs:
        if not (math.isfinite(r) and r >= 1.0):
            raise ValueError(f"reduction must be a number >= 1.0, got {r!r}")
    sweep = tuple(float(t) for t in thresholds) if thresholds else ()
    for t in sweep:
        if not 0.0 < t < 1.0:
            raise ValueError(f"thresholds must lie between 0 and 1, got {t!r}")
    tallies = {float(r): _Tally(methods, lesions, sweep) for r, methods in runs.items()}
    for k, (stem, rgb, masks) in enumerate(images):
        shape = tuple(rgb.shape[:2])
        for code in lesions:
            gt = _ground_truth(masks, code, shape, stem)
            for reduction, tally in tallies.items():
                # an empty mask gets no ellipses; the refiners are still asked, so a prediction there counts as 0
                ellipses = simulate_coarse_ellipses(gt, code, reduction=reduction, seed=seed + k)
                tally.ellipses[code] += len(ellipses)
                regions = ellipse_regions(ellipses, shape)
                predictions: dict[tuple, np.ndarray] = {}
                for method in tally.methods:
                    key, compute = _prediction(method, refiner, baseline, rgb, ellipses, code, shape, bool(sweep))
                    if key not in predictions:
                        predictions[key] = np.asarray(compute(), dtype=np.float32 if sweep and key[0] == "refiner" else bool)
                    pred = predictions[key]
                    if pred.dtype != bool:  # a probability map: the refiner's own threshold, then the sweep
                        for t, per in tally.threshold_ious.items():
                            per[method][code].append(iou(pred >= t, gt))
                        pred = pred >= refiner.threshold
                    tally.add(method, code, iou(pred, gt), ellipse_overlaps(pred, gt, regions))
                if each_lesion:
                    each_lesion(reduction, rgb, code, ellipses)
        if progress:
            progress(k + 1, stem)
    return {r: t.result() for r, t in tallies.items()}


def score_refinement(
    refiner,
    images: Iterable[ScoredImage],
    reduction: float = 1.0,
    seed: int = 0,
    lesions: Sequence[str] | None = None,
    methods: Sequence[str] = FIGURE_METHODS,
    baseline=None,
    thresholds: Sequence[float] | None = None,
) -> dict:
    """The figures of `evaluate refine` for a model and images held in memory.

    `refiner`: anything with `refine_mask(rgb, ellipses, threshold=None, superpixels=None)`,
    `.threshold`, `.superpixels` (and `.config` for its lesions). `images`: (stem, rgb,
    {lesion: mask}) in the order of the split's records (image k gets seed `seed + k`).
    `lesions`: default the model's. Returns {"reduction", "seed", "lesions", "ellipses",
    "iou_percent", "by_size"}; `result["iou_percent"]["model"]["average"]["mean"]` is what
    `evaluate refine` prints as `by_reduction/<reduction>/model/average/mean`.

    `thresholds` (needs `refiner.refine_probability`) adds "by_threshold": {threshold_key(t):
    {method: iou table}}, each network pass thresholded at every t; the table at t is what
    `evaluate refine` prints for a model folder whose config.json has threshold t.
    """
    r = float(reduction)
    lesions = refined_lesions(refiner) if lesions is None else tuple(_lesion(c).code for c in lesions)
    result = score_refinement_runs(
        refiner, images, {r: tuple(methods)}, seed=seed, lesions=lesions, baseline=baseline, thresholds=thresholds
    )[r]
    return {"reduction": r, "seed": seed, "lesions": list(lesions), **result}


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


def _read_images(records: list[ImageRecord], lesions: Sequence[str]) -> Iterable[ScoredImage]:
    # one image at a time: a split of full-size IDRiD images does not fit in memory at once
    for rec in records:
        rgb = read_fundus(rec.image)
        yield rec.stem, rgb, _labels(rec, lesions, rgb.shape[:2])


def _labels(rec: ImageRecord, lesions: Sequence[str], shape: tuple[int, int]) -> dict[str, np.ndarray]:
    """The masks `evaluate refine` scores against: the data set's files, or for an image inside an
    annotation project the grader's confirmed pixels there (what its mask files hold; a folder
    of an older form, whose files held pending proposals too, reads the same)."""
    if rec.project is None:
        return {c: read_mask(rec.masks[c], expected_shape=shape) for c in lesions if c in rec.masks}
    from .io.project import ProjectFolder

    ann = ProjectFolder(rec.project).load()
    if tuple(ann.shape) != tuple(shape):
        raise RetinaInputError(f"{rec.project}: masks of {ann.shape[1]}x{ann.shape[0]}, image {shape[1]}x{shape[0]}")
    for c in lesions:
        if c in ann.unreadable:
            raise RetinaInputError(ann.unreadable[c])
    return {c: ann.confirmed(c) for c in lesions if c in rec.masks}


def evaluate_refine(
    data: str | Path,
    model_dir: str | Path | None = None,
    baseline_dir: str | Path | None = None,
    reduction: float = 1.0,
    split: str = "all",
    seed: int = 0,
    lesions: Sequence[str] | None = None,
    latency_samples: int = 100,
    limit: int | None = None,
    progress=None,
    reductions: Sequence[float] = DEFAULT_REDUCTIONS,
    validation_images: Sequence[str] | None = None,
) -> dict:
    """The JSON document of `napari-retina evaluate refine` (layout in the module docstring).

    `validation_images`: the images `split="val"` means (default: those of the model's card).
    """
    from .models.refiner import EllipseRefiner

    refiner = EllipseRefiner(model_dir)
    baseline = EllipseRefiner(baseline_dir) if baseline_dir else None
    try:
        lesions = refined_lesions(refiner) if lesions is None else tuple(_lesion(c).code for c in lesions)
    except ValueError as e:
        raise RetinaInputError(f"{refiner.model_dir}: config.json lesions: {e}") from None
    records = _records(Path(data), split, validation_images or refiner.config.get("validation_images"))
    if limit:
        records = records[:limit]
    extra = ("baseline",) if baseline else ()
    table_methods, figure_methods = TABLE_METHODS + extra, FIGURE_METHODS + extra
    reduction = float(reduction)
    reductions = list(dict.fromkeys(float(r) for r in reductions))
    runs = {r: figure_methods for r in reductions}
    runs[reduction] = tuple(dict.fromkeys(runs.get(reduction, ()) + table_methods))

    latencies: list[float] = []

    def time_ellipses(r: float, rgb: np.ndarray, code: str, ellipses: list[Ellipse]) -> None:
        # latency as the annotator sees it: one ellipse at a time, the shipped setting,
        # a few ellipses of every image and lesion so that sizes vary
        if r != reduction:
            return
        for e in ellipses[:3]:
            if len(latencies) < latency_samples:
                t0 = time.perf_counter()
                refiner.refine_each(rgb, [e])
                latencies.append(time.perf_counter() - t0)

    results = score_refinement_runs(
        refiner,
        _read_images(records, lesions),
        runs,
        seed=seed,
        lesions=lesions,
        baseline=baseline,
        progress=(lambda k, stem: progress(k, len(records), stem)) if progress else None,
        each_lesion=time_ellipses,
    )
    primary = results[reduction]
    lat_ms = np.array(latencies) * 1000
    return {
        "data": str(data),
        "split": split,
        "images": [r.stem for r in records],
        "reduction": reduction,
        "seed": seed,
        "ellipses": primary["ellipses"],
        "model": refiner.description | {"superpixels_default": bool(refiner.superpixels)},
        "baseline": baseline.description if baseline else None,
        "iou_percent": {m: primary["iou_percent"][m] for m in table_methods},
        "reductions": reductions,
        "by_reduction": {reduction_key(r): {m: results[r]["iou_percent"][m] for m in figure_methods} for r in reductions},
        "size_buckets": dict(SIZE_BUCKETS),
        "by_size": {reduction_key(r): {m: results[r]["by_size"][m] for m in figure_methods} for r in reductions},
        "latency_ms_per_ellipse": {
            "median": round(float(np.median(lat_ms)), 1) if len(lat_ms) else None,
            "p95": round(float(np.percentile(lat_ms, 95)), 1) if len(lat_ms) else None,
            "n": int(len(lat_ms)),
            "device": "cpu",
        },
    }
