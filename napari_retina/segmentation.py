"""Whole-image segmenters at work: files, annotation projects and evaluation (headless).

The CLI (`napari-retina segment`, `evaluate ex`), the annotator's "Find exudates" and
training's validation call these, so all of them write, propose and score alike.

Proposals: a segmenter's map enters an image's pixel record (napari_retina.proposals) as
one proposal per `BLOCK` x `BLOCK` block of the image that holds a candidate (probability
>= `FLOOR`), carrying its probabilities, so the threshold moves live, the grader accepts
or erases, and a rerun withdraws only the model's unaccepted pixels; the grader's own
pixels are never touched. Blocks keep every record operation local and bounded (at most
54 on a 4288 x 2848 image).
"""

from __future__ import annotations

import math
import time
from pathlib import Path
from typing import Callable, Optional

import numpy as np

from .io.errors import RetinaInputError
from .proposals import PixelChange, PixelRecord

SEGMENTER_KINDS = {"EX": "exudates", "MA": "microaneurysms"}  # lesion -> the registry's model kind that segments it
# how to train the model of each lesion, for the message when none is installed
TRAIN_COMMANDS = {
    "EX": "`python -m training exudates --data DIR --out MODEL_DIR`",
    "MA": "`python -m training ma-hgn` (at --scale 1.0 and 0.5) and `ma-prn`, then `python -m training microaneurysms`",
}
BLOCK = 512  # full-resolution pixels per proposal block side
FLOOR = 0.05  # probabilities below this are not proposed at any threshold


def propose_block(
    record: PixelRecord,
    lesion: str,
    box: tuple[int, int, int, int],
    sub: np.ndarray,
    threshold: float,
    description: dict,
    floor: float = FLOOR,
    withdrawn: list | None = None,
) -> list[PixelChange]:
    """Put one block's probabilities (`sub`, the shape of `box`) into `record`; returns the changes.

    The model's earlier proposals of this lesion in this block (not yet accepted) are withdrawn
    first (appended to `withdrawn` when given), so running a segmenter twice never stacks its
    pixels; what the grader erased in the block stays erased.
    """
    model = description.get("model")
    changes: list[PixelChange] = []
    # what the grader rejected in this block stays rejected when the model runs again
    erased = np.zeros((box[1] - box[0], box[3] - box[2]), bool)
    for p in record.find(model=model, block=[box[0], box[2]]):
        if p.lesion == lesion:
            pr0, pr1, pc0, pc1 = p.box
            erased[pr0 - box[0] : pr1 - box[0], pc0 - box[2] : pc1 - box[2]] |= p.erased
            if withdrawn is not None:
                withdrawn.append(p)
            c = record.withdraw(p.id)
            if c is not None:
                changes.append(c)
    if not (sub >= floor).any():
        return changes
    data = np.where(sub >= floor, sub, 0.0).astype(np.float32)
    desc = dict(description, block=[box[0], box[2]])
    _, change = record.propose(lesion, box, prob=data, threshold=threshold, description=desc,
                               erased=erased if erased.any() else None)
    if change is not None:
        changes.append(change)
    return changes


def blocks_of(shape: tuple[int, int], block: int = BLOCK):
    """The proposal blocks (r0, r1, c0, c1) of an image of `shape`, row by row from (0, 0)."""
    h, w = shape
    for br in range(0, h, block):
        for bc in range(0, w, block):
            yield br, min(br + block, h), bc, min(bc + block, w)


def propose_map(
    record: PixelRecord,
    lesion: str,
    prob: np.ndarray,
    threshold: float,
    description: dict,
    block: int = BLOCK,
    floor: float = FLOOR,
) -> list[PixelChange]:
    """Put a full-size probability map into `record` as block proposals; returns the changes.

    Each block as `propose_block`: earlier unaccepted proposals of the model are replaced,
    the grader's erasures kept.
    """
    changes: list[PixelChange] = []
    for box in blocks_of(prob.shape, block):
        changes += propose_block(record, lesion, box, prob[box[0] : box[1], box[2] : box[3]], threshold,
                                 description, floor)
    return changes


class RunProposals:
    """One segmenter run's proposals, block by block as the map is made; undone whole on cancel.

    `add` proposes a block as soon as its values are final (`LesionSegmenter.probability`'s
    `on_block`), so candidates appear while the model runs; `finish` proposes the blocks not
    yet added from the finished map; `roll_back` withdraws what this run proposed and puts
    back the proposals it replaced, so a cancelled run leaves the record as it found it.
    """

    def __init__(self, record: PixelRecord, lesion: str, threshold: float, description: dict,
                 block: int = BLOCK, floor: float = FLOOR):
        self.record, self.lesion, self.threshold = record, lesion, float(threshold)
        self.description, self.block, self.floor = dict(description), block, floor
        self.done: set[tuple[int, int]] = set()  # block origins proposed by this run
        self.replaced: list = []  # the proposals this run withdrew, as they were
        self.closed = False

    def add(self, box: tuple[int, int, int, int], sub: np.ndarray) -> list[PixelChange]:
        if self.closed or (box[0], box[2]) in self.done:
            return []
        self.done.add((box[0], box[2]))
        return propose_block(self.record, self.lesion, box, sub, self.threshold, self.description, self.floor,
                             withdrawn=self.replaced)

    def finish(self, prob: np.ndarray) -> list[PixelChange]:
        changes: list[PixelChange] = []
        for box in blocks_of(prob.shape, self.block):
            changes += self.add(box, prob[box[0] : box[1], box[2] : box[3]])
        self.closed = True
        return changes

    def roll_back(self) -> list[PixelChange]:
        if self.closed:
            return []
        self.closed = True
        model = self.description.get("model")
        changes: list[PixelChange] = []
        mine = []  # this run's proposals: what the grader erased on them while it ran stays erased
        for p in self.record.find(model=model):
            if p.lesion == self.lesion and tuple(p.description.get("block", ())) in self.done:
                mine.append((p.box, p.erased.copy()))
                c = self.record.withdraw(p.id)
                if c is not None:
                    changes.append(c)
        for p in self.replaced:
            erased = p.erased.copy()
            for box, gone in mine:
                r0, r1 = max(box[0], p.box[0]), min(box[1], p.box[1])
                c0, c1 = max(box[2], p.box[2]), min(box[3], p.box[3])
                if r0 < r1 and c0 < c1:
                    erased[r0 - p.box[0] : r1 - p.box[0], c0 - p.box[2] : c1 - p.box[2]] |= \
                        gone[r0 - box[0] : r1 - box[0], c0 - box[2] : c1 - box[2]]
            data = {"prob": p.prob} if p.prob is not None else {"mask": p.fixed}
            _, c = self.record.propose(p.lesion, p.box, threshold=p.threshold, description=p.description,
                                       erased=erased if erased.any() else None, **data)
            if c is not None:
                changes.append(c)
        return changes


def candidate_floor(segmenter, threshold: float | None = None) -> float:
    """Where a candidate region of `segmenter`'s map ends: the model's own floor if it has one,
    else half the threshold (`threshold`, or the model's own when None)."""
    floor = getattr(segmenter, "candidate_floor", None)
    if floor is not None:
        return float(floor)
    return float(segmenter.threshold if threshold is None else threshold) / 2


def propose_candidates(
    record: PixelRecord,
    lesion: str,
    prob: np.ndarray,
    threshold: float,
    description: dict,
    floor: float | None = None,
    margin: int = 2,
    components: tuple[float, np.ndarray, int] | None = None,
) -> tuple[list[PixelChange], int]:
    """Put a map into `record` as one proposal per candidate lesion (microaneurysms); (changes, proposed).

    A candidate is a connected region (8-connectivity) of `prob` >= `floor` (default half the
    threshold, so the slider can still grow and shrink it), proposed on its box (+ `margin`)
    with its probabilities, its most probable pixel as `centre` and its peak as `score`. The
    model's earlier unaccepted candidates of this lesion are withdrawn first; a candidate is
    left out when it touches the grader's own pixels (accepted or painted: never touched) or
    holds the centre of a candidate the grader rejected (a rerun never brings it back).
    `components`: (floor, labels, count) of `metrics.label_lesions(prob >= floor)` computed
    beforehand (off the GUI thread), used when its floor is this call's.
    """
    from scipy import ndimage

    from .metrics import label_lesions

    model = description.get("model")
    # what the grader erased on earlier candidates stays erased (where a new candidate covers it)
    erased_before = np.zeros(prob.shape, bool)
    for p in record.find(model=model, candidate=True):
        if p.lesion == lesion and p.erased.any():
            erased_before[p.slices] |= p.erased
    changes = [c for c in record.withdraw_where(model=model, candidate=True) if c is not None]
    floor = float(threshold) / 2 if floor is None else float(floor)
    if components is not None and components[0] == floor:
        labels, n = components[1], components[2]
    else:
        labels, n = label_lesions(prob >= floor)
    if n == 0:
        return changes, 0
    hand = record.hand(lesion)
    rejected = np.zeros(prob.shape, bool)
    for d in record.decided(lesion, "rejected", model=model):
        r, c = d["centre"]
        if 0 <= r < prob.shape[0] and 0 <= c < prob.shape[1]:
            rejected[r, c] = True
    h, w = prob.shape
    proposed = 0
    for k, sl in enumerate(ndimage.find_objects(labels), start=1):
        if sl is None:
            continue
        r0, r1 = max(0, sl[0].start - margin), min(h, sl[0].stop + margin)
        c0, c1 = max(0, sl[1].start - margin), min(w, sl[1].stop + margin)
        region = labels[r0:r1, c0:c1] == k
        if (hand[r0:r1, c0:c1] & region).any() or (rejected[r0:r1, c0:c1] & region).any():
            continue
        sub = np.where(region, prob[r0:r1, c0:c1], 0.0).astype(np.float32)
        rr, cc = np.unravel_index(int(np.argmax(sub)), sub.shape)
        desc = dict(description, candidate=True, centre=[r0 + int(rr), c0 + int(cc)], score=round(float(sub.max()), 6))
        gone = erased_before[r0:r1, c0:c1] & region
        _, change = record.propose(lesion, (r0, r1, c0, c1), prob=sub, threshold=threshold, description=desc,
                                   erased=gone if gone.any() else None)
        proposed += 1
        if change is not None:
            changes.append(change)
    return changes, proposed


def segment_into_project(image_record, segmenter, project_root=None, grader: str | None = None) -> dict:
    """Pre-annotate one image's project with the segmenter's candidates; returns a summary.

    Opens the image as the annotator does (its project if there is one, else its masks),
    proposes the map, and saves the project folder (atomic writes, as autosave does). The
    proposals are PENDING: they are saved in the proposal record only, so the mask files,
    overlay.png and lesions.csv keep the confirmed pixels they had (none in a new project)
    until a grader accepts. `proposed_px`: pixels newly shown as pending.
    """
    from .session import open_record
    from .io.project import ProjectWriter

    opened = open_record(image_record, project_root=project_root)
    seg = segmenter.segment(opened.rgb)
    ann = opened.annotation
    shown_before = ann.masks[seg.lesion].copy()
    desc = {"kind": "model", **segmenter.description}
    ann.provenance.setdefault("models", {})[segmenter.kind] = segmenter.description
    if getattr(segmenter, "proposes", "blocks") == "candidates":
        propose_candidates(ann.record, seg.lesion, seg.prob, seg.threshold, desc,
                           floor=candidate_floor(segmenter, seg.threshold))
    else:
        propose_map(ann.record, seg.lesion, seg.prob, seg.threshold, desc)
    writer = ProjectWriter(opened.project_dir, opened.record.image, opened.rgb, ann, grader=grader)
    from .fundus import field_of_view_mask

    writer.set_fov(field_of_view_mask(opened.rgb))
    writer.write(ann.snapshot(ellipses=ann.ellipses, all_lesions=not opened.from_project), summary=True, grader=grader)
    added = int(np.count_nonzero(ann.masks[seg.lesion] & ~shown_before))
    return {"image": opened.record.image.name, "project": str(opened.project_dir), "lesion": seg.lesion,
            "proposed_px": added, "seconds": round(seg.seconds, 2)}


def write_outputs(out: Path, stem: str, seg) -> tuple[Path, Path]:
    """`<stem>_<LESION>.tif` (binary, 1-bit palette) and `<stem>_<LESION>_prob.tif` (uint8 0-255)."""
    import tifffile

    from .io.atomic import atomic_path
    from .io.masks import write_mask

    mask_path = out / f"{stem}_{seg.lesion}.tif"
    prob_path = out / f"{stem}_{seg.lesion}_prob.tif"
    write_mask(mask_path, seg.mask)
    with atomic_path(prob_path) as tmp:
        tifffile.imwrite(tmp, seg.prob_uint8, compression="zlib")
    return mask_path, prob_path


# ---- evaluation ---------------------------------------------------------------------------------


class SegmentationScore:
    """Accumulates one map per image and gives the JSON of `evaluate ex|ma` (one pass over the images)."""

    def __init__(self, threshold: float):
        from .metrics import LesionFROC, PixelPR

        self.threshold = float(threshold)
        self.pr, self.froc = PixelPR(), LesionFROC(candidate_threshold=min(0.1, self.threshold))
        self.per_image: list[dict] = []
        self.lesion_rows: list = []

    def add(self, name: str, prob: np.ndarray, gt: np.ndarray, fov: np.ndarray) -> None:
        from .metrics import iou, lesion_counts, precision_recall_f1

        q = np.round(np.clip(prob, 0, 1) * 255).astype(np.uint8)  # scored as `segment` stores it
        self.pr.add(q, gt, region=fov)
        self.froc.add(q, gt, region=fov)
        pred = (q >= self.pr.bin_of(self.threshold)) & fov
        gt_fov = gt & fov  # the pixels the pooled figures count too
        p, r, f1 = precision_recall_f1(pred, gt_fov)
        self.per_image.append({"image": name, "precision": p, "recall": r, "f1": f1, "iou": iou(pred, gt_fov)})
        self.lesion_rows.append(lesion_counts(pred, gt_fov))

    def result(self) -> dict:
        from .metrics import summarise_lesion_counts

        def mean(key):
            v = [d[key] for d in self.per_image if not math.isnan(d[key])]
            return float(np.mean(v)) if v else math.nan

        return {
            "threshold": self.threshold,
            "aupr": self.pr.aupr(),
            **self.pr.at_threshold(self.threshold),
            "per_image_mean": {k: mean(k) for k in ("precision", "recall", "f1", "iou")},
            "lesion_level": summarise_lesion_counts(self.lesion_rows),
            "froc": self.froc.points(),
            "froc_score": self.froc.score(),
            "per_image": self.per_image,
        }


def _scored_images(data: Path, segmenter, split: str, limit: int | None, validation_images, progress):
    """(record, rgb, field of view, ground truth) of each labelled image of the split; the left-out names."""
    from .evaluation import _records
    from .fundus import field_of_view_mask
    from .io.images import read_fundus
    from .session import graders_mask

    records = _records(Path(data), split, validation_images or segmenter.config.get("validation_images"))
    if limit:
        records = records[:limit]
    left_out: list[str] = []

    def gen():
        for k, rec in enumerate(records, 1):
            if progress:
                progress(k, len(records), rec.stem)
            rgb = read_fundus(rec.image)
            gt = graders_mask(rec, segmenter.lesion, rgb.shape[:2])  # unaccepted proposals are not ground truth
            if gt is None:
                left_out.append(rec.image.name)  # no label for this lesion here
                continue
            yield rec, rgb, field_of_view_mask(rgb), gt

    return gen(), left_out


def evaluate_segmenter(
    data: Path,
    segmenter,
    split: str = "all",
    limit: int | None = None,
    progress: Optional[Callable[[int, int, str], None]] = None,
    maps: Optional[Callable[[object], np.ndarray]] = None,
    validation_images: Optional[list] = None,
) -> dict:
    """Score a segmenter on an IDRiD-layout folder: the JSON `evaluate ex` prints.

    Pixel level, pooled over every field-of-view pixel of the split (the IDRiD challenge's
    AUPR, from 256-bin histograms) and averaged per image; lesion level (8-connectivity, a
    predicted lesion counts when it touches a ground-truth lesion): figures at the threshold
    and FROC points. Labels follow `session.graders_masks` (an image without one for the
    lesion is left out and named). `maps` replaces the segmenter's own map (tests, cached runs).
    """
    images, left_out = _scored_images(data, segmenter, split, limit, validation_images, progress)
    score, seconds = SegmentationScore(segmenter.threshold), []
    for rec, rgb, fov, gt in images:
        t0 = time.perf_counter()
        prob = maps(rec) if maps is not None else segmenter.probability(rgb, fov)
        seconds.append(time.perf_counter() - t0)
        score.add(rec.image.name, prob, gt, fov)
    return _json_safe(_document(data, segmenter, split, score, left_out, seconds))


def _document(data, segmenter, split, score: SegmentationScore, left_out, seconds) -> dict:
    from .models.precision import inference_dtype

    r = score.result()
    return {"model": segmenter.description, "lesion": segmenter.lesion, "data": str(data), "split": split,
            "precision": inference_dtype(getattr(segmenter, "device", "cpu")),
            "images": len(score.per_image), "left_out": left_out, **r,
            "seconds_per_image": float(np.mean(seconds)) if seconds else math.nan}


def evaluate_variants(data: Path, detector, split: str = "all", limit: int | None = None,
                      progress: Optional[Callable[[int, int, str], None]] = None,
                      validation_images: Optional[list] = None) -> dict:
    """`evaluate_segmenter` of a detector's final map, plus each of its stages under `variants`.

    The stages (`detector.maps`: the microaneurysm paper's Table 2 rows) come from one run of
    each network per image and are scored in the same pass, so memory holds one image's maps.
    """
    images, left_out = _scored_images(data, detector, split, limit, validation_images, progress)
    names = detector.variant_names()
    scores = {name: SegmentationScore(detector.threshold) for name in names}
    seconds = []
    for rec, rgb, fov, gt in images:
        t0 = time.perf_counter()
        out = detector.maps(rgb, fov)
        seconds.append(time.perf_counter() - t0)
        for name in names:
            scores[name].add(rec.image.name, out[name], gt, fov)
    final = "refined" if "refined" in scores else detector.fusion  # without a PRN the fused map is final
    result = _document(data, detector, split, scores[final], left_out, seconds)
    keys = ("aupr", "precision", "recall", "f1", "iou", "froc", "froc_score")
    result["variants"] = {name: {k: v for k, v in scores[name].result().items() if k in keys} for name in names}
    return _json_safe(result)


def _json_safe(v):
    """nan -> None (JSON has no NaN), recursively; floats rounded to 6 digits."""
    if isinstance(v, dict):
        return {k: _json_safe(x) for k, x in v.items()}
    if isinstance(v, (list, tuple)):
        return [_json_safe(x) for x in v]
    if isinstance(v, (float, np.floating)):
        return None if math.isnan(v) else round(float(v), 6)
    if isinstance(v, np.integer):
        return int(v)
    return v


def default_segmenter_dir(lesion: str) -> Path:
    """The model folder in use for a lesion's segmenter (the selected version, else the shipped one)."""
    from .models.versions import current_model_dir

    if lesion not in SEGMENTER_KINDS:
        raise RetinaInputError(f"no segmenter for {lesion} yet (available: {', '.join(SEGMENTER_KINDS)})")
    return current_model_dir(SEGMENTER_KINDS[lesion])


def load_segmenter(lesion: str, model_dir: str | Path | None = None, device: str = "cpu"):
    """The segmenter of `lesion` (the shipped one unless `model_dir`), checked by the registry."""
    from .models.registry import load_model

    folder = Path(model_dir) if model_dir else default_segmenter_dir(lesion)
    if model_dir is None and not folder.is_dir():
        raise RetinaInputError(
            f"no {lesion} segmentation model is installed yet: train one with "
            f"{TRAIN_COMMANDS.get(lesion, 'python -m training')}, or give --model MODEL_DIR"
        )
    if str(device).startswith("cuda"):
        import torch

        if not torch.cuda.is_available():
            raise RetinaInputError(f"--device {device}: no CUDA device here (use cpu)")
    elif str(device) != "cpu":
        raise RetinaInputError(f"--device must be cpu, cuda or cuda:N, not {device!r}")
    seg = load_model(folder, expect=SEGMENTER_KINDS[lesion], device=device)
    if getattr(seg, "lesion", None) != lesion:
        raise RetinaInputError(f"{folder}: segments {getattr(seg, 'lesion', '?')}, not {lesion}")
    return seg


# ---- microaneurysms: clicks and review (headless; the widget forwards and paints) -------------


def click_lesion(record: PixelRecord, rgb: np.ndarray, lesion: str, point) -> tuple[list[PixelChange], str]:
    """A grader's click with the microaneurysm tool; returns (changes, what happened).

    On a lesion pixel: a live model candidate there is rejected (remembered, as in review),
    anything else under the click (the connected lesion) is erased. Elsewhere: a
    microaneurysm is added as the grader's own, a disc at the dark centre near the click,
    sized from the image (`models.microaneurysms.snap_microaneurysm`).
    """
    from .models.microaneurysms import disc_box, lesion_under, snap_microaneurysm

    mask = record.masks[lesion]
    r, c = int(round(point[0])), int(round(point[1]))
    if not (0 <= r < mask.shape[0] and 0 <= c < mask.shape[1]):
        return [], "outside the image"
    if mask[r, c]:
        for p in record.of_lesion(lesion):
            pr0, pr1, pc0, pc1 = p.box
            if p.description.get("candidate") and pr0 <= r < pr1 and pc0 <= c < pc1 and p.claim()[r - pr0, c - pc0]:
                change = record.decide(p.id, "rejected")
                return ([change] if change else []), "candidate rejected"
        found = lesion_under(mask, (r, c))
        box, comp = found
        change = record.hand_edit(lesion, box, erased=comp)
        return ([change] if change else []), "removed"
    centre, radius = snap_microaneurysm(rgb, (r, c))
    box, disc = disc_box(centre, radius, mask.shape)
    change = record.hand_edit(lesion, box, painted=disc)
    return ([change] if change else []), f"added (radius {radius:.1f} px)"


def review_queue(record: PixelRecord, lesion: str) -> list[int]:
    """Ids of the live model candidates of `lesion`, most probable first."""
    props = [p for p in record.of_lesion(lesion) if p.description.get("candidate")]
    return [p.id for p in sorted(props, key=lambda p: (-float(p.description.get("score", 0.0)), p.id))]


def review_counts(record: PixelRecord, lesion: str) -> dict[str, int]:
    """Accepted, rejected and pending model candidates of `lesion` (what the review panel shows)."""
    return {"accepted": len(record.decided(lesion, "accepted")), "rejected": len(record.decided(lesion, "rejected")),
            "pending": len(review_queue(record, lesion))}
