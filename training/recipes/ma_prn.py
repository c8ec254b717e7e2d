"""python -m training ma-prn: train the microaneurysm patch-wise refinement network (PRN).

    python -m training ma-prn --data DIR [DIR ...] --out MODEL_DIR [--loss triplet|ce]
        [--epochs N | --minutes M] [--margin 0.5] [--refresh-every 2] ...

After Sarhan, Albarqouni, Yigitsoy, Navab and Eslami, "Multi-scale Microaneurysms Segmentation
Using Embedding Triplet Loss", MICCAI 2019, sections 2 and 3.1: a classifier
of 129 x 129 patches of the contrast-enhanced photograph (`subtract_local_background`) at full
resolution, "is the centre pixel a microaneurysm?" (`nets.patch_classifier.PatchClassifier`).

- Each item is a triplet: anchor and positive centred on two microaneurysm pixels drawn
  uniformly from the training images' masks, negative a healthy location (more than
  `--clearance` px from every microaneurysm) drawn by selective sampling
  (`training.sampling.SelectiveSampler`). Flips, quarter turns, brightness and contrast.
- Loss (`--loss triplet`, the paper's PRN): cosine triplet loss on the embeddings after global
  average pooling, margin 0.5, plus the cross-entropy of the anchor (1) and the negative (0).
  `--loss ce` is the paper's "cls" ablation: the cross-entropy alone.
- Selective sampling: the healthy pool (`--healthy-per-image` random field-of-view locations
  per image) starts uniform; every `--refresh-every` epochs the current network scores
  `--refresh-size` of them and their loss (-log(1 - p)) becomes their drawing weight, so hard
  negatives come back more often (the paper refreshes every 10 of its much longer epochs).
- Hard negatives (`--hard-negatives DETECTOR_DIR`): random healthy locations are mostly easy
  (flat retina), while at inference the PRN only ever sees the hypothesis networks'
  candidates. With a detector folder, its candidate lesions (fused map, before any PRN) that
  lie farther than `--clearance` from every microaneurysm join the healthy pool of every
  image, training and validation alike (at most `--hard-per-image`, the most probable first),
  so selective sampling draws from the false positives the PRN is there to remove, and
  `val_aupr` scores the PRN on them too. They are mined once per run (`hard_negatives.json`
  in the run folder, kept for `--resume`).
  Under torchrun every process refreshes its own sampler the same way (same patches, same
  weights: DDP keeps them equal), so all draw hard negatives more often.
- The detector's own decision (`--candidates DETECTOR_DIR`): the hypothesis networks' candidate
  lesions (fused map at the detector's threshold, scored at their most probable pixel, as at
  inference) on every image, mined once per run (`candidates.json` in the run folder). Those
  that touch a microaneurysm (the lesion rule of `metrics.py`) join the lesion patches, which
  are then those candidates plus every microaneurysm's centre; the others join the healthy pool.
  Validation then ranks the held-out images' candidates by the PRN's score and by the
  detector's rule `--rule` (geometric, sqrt(peak x score), or rerank, t + (peak - t) x score;
  ROC AUC; the peak alone is the baseline), and early stopping follows the rule's. Random
  healthy locations alone are mostly flat retina, while
  at inference the PRN sees only candidates: random microaneurysm pixels against them taught it
  little the map did not know (README, "Microaneurysms"). `--jitter` moves the training
  microaneurysm patches' centres.
- Validation: the held-out images' patches, every microaneurysm (one centre per connected
  lesion) against `--healthy-per-image` healthy locations each, scored by the area under the
  precision-recall curve (`val_aupr`, early stopping). The whole detector (HGNs + PRN) is
  scored by `napari-retina evaluate ma` once assembled (`python -m training microaneurysms`).
"""

from __future__ import annotations

import argparse
import datetime
import json
import platform
import time
from pathlib import Path

import numpy as np

from napari_retina import __version__
from napari_retina.io.errors import RetinaInputError

from ._main import (
    PATH_RULE, add_optimisation_args, add_run_args, advice, data_names, ema_text, optimisation_kwargs, parent_record,
    parent_text, portable_command, precision, say_end,
)
from ..data import (
    DataError, describe_labels, gather_records, labelled, parents_held_out, split_by_image, write_split,
)

LESION = "MA"
# the detector's ways of combining a candidate's peak p with the PRN's score s (models.microaneurysms.PRN_RULES)
PRN_RULE_NAMES = {"geometric": "sqrt(peak x score)", "rerank": "t + (peak - t) x score"}


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training ma-prn",
                                description="Train the microaneurysm patch-wise refinement network (triplet loss).")
    p.add_argument("--data", nargs="+", required=True, metavar="DIR",
                   help="IDRiD-layout, flat or annotation project folders with MA masks")
    p.add_argument("--out", required=True, metavar="MODEL_DIR", help="model folder to write")
    p.add_argument("--loss", choices=("triplet", "ce"), default="triplet",
                   help="triplet: cosine triplet + cross-entropy (the PRN); ce: cross-entropy only (default %(default)s)")
    p.add_argument("--margin", type=float, default=0.5, help="triplet margin (default %(default)s, the paper's)")
    p.add_argument("--widths", type=int, nargs=4, default=[16, 32, 64, 128], help="channels of the four stages")
    p.add_argument("--clearance", type=int, default=10, help="healthy centres lie this far from every microaneurysm")
    p.add_argument("--healthy-per-image", type=int, default=300)
    p.add_argument("--refresh-every", type=int, default=2, help="epochs between selective-sampling refreshes")
    p.add_argument("--refresh-size", type=int, default=2000, help="healthy patches scored per refresh")
    p.add_argument("--hard-negatives", metavar="DETECTOR_DIR",
                   help="a microaneurysm detector folder: its candidate lesions away from every microaneurysm "
                        "join the healthy pool (training and validation)")
    p.add_argument("--candidates", metavar="DETECTOR_DIR",
                   help="a microaneurysm detector folder: train and validate on its own decision, its candidate "
                        "lesions that touch a microaneurysm (with every microaneurysm's centre) against those that "
                        "do not (with --healthy-per-image random healthy locations); early stopping on how well "
                        "--rule ranks the validation candidates (ROC AUC)")
    p.add_argument("--rule", choices=tuple(PRN_RULE_NAMES), default="geometric",
                   help="with --candidates: the detector's prn_rule that early stopping ranks the candidates by "
                        "(geometric: sqrt(peak x score), the paper's; rerank: t + (peak - t) x score); "
                        "default %(default)s")
    p.add_argument("--hard-per-image", type=int, default=200,
                   help="at most this many hard negatives (or candidates) per image, the most probable first "
                        "(default %(default)s)")
    p.add_argument("--jitter", type=int, default=0,
                   help="move each training microaneurysm patch's centre by up to this many pixels (negatives stay "
                        "where they are: a moved one could land on a microaneurysm; default %(default)s)")
    add_run_args(p, init="start from this ma-prn model folder's weights", batch_size=16,
                 batch_help="triplets per step (the paper: 90)", lr=1e-4,
                 lr_help="Adam learning rate (default %(default)s; the paper: 1e-5)", samples=2000,
                 samples_help="triplets per epoch", patience=8,
                 patience_help="early stopping on the validation patch AUPR, or with --candidates on the "
                               "candidates' ROC AUC (epochs without improvement)",
                 workers=False)
    add_optimisation_args(p)
    return p


def _validate_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    if a.epochs is None and a.minutes is None:
        p.error("give --epochs N or --minutes M (or both)")
    if not 0 < a.margin <= 2:
        p.error(f"--margin must lie in (0, 2] (cosine distances lie in [0, 2]), not {a.margin}")
    if a.healthy_per_image < 1 or a.refresh_every < 1 or a.refresh_size < 1 or a.clearance < 0:
        p.error("--healthy-per-image, --refresh-every and --refresh-size must be positive, --clearance >= 0")
    if a.batch_size < 2:
        p.error("--batch-size must be at least 2")
    if a.hard_per_image < 1:
        p.error("--hard-per-image must be positive")
    if a.hard_negatives and a.candidates:
        p.error("give --hard-negatives or --candidates, not both")
    if not 0 <= a.jitter <= 16:
        p.error("--jitter must lie in 0..16 pixels")
    if a.rule != "geometric" and not a.candidates:
        p.error("--rule ranks a detector's candidates: give --candidates DETECTOR_DIR with it")


def far_from(mask: np.ndarray, clearance: int) -> np.ndarray:
    """Pixels farther than `clearance` (chessboard distance) from every pixel of `mask`."""
    import cv2

    if not clearance:
        return ~mask
    return ~cv2.dilate(mask.astype(np.uint8), np.ones((2 * clearance + 1,) * 2, np.uint8)).astype(bool)


def hard_negative_centres(fused: np.ndarray, threshold: float, fov: np.ndarray, ma: np.ndarray, clearance: int,
                          limit: int) -> np.ndarray:
    """(n, 2) scored pixels of the candidate lesions of `fused` (as the detector finds them) that lie
    wholly farther than `clearance` from every microaneurysm of `ma`: the most probable `limit` first."""
    from napari_retina.models.microaneurysms import candidate_regions

    cands = candidate_regions(fused, threshold, fov)
    if not len(cands):
        return np.zeros((0, 2), np.int32)
    near = np.zeros(len(cands) + 1, bool)
    near[np.unique(cands.labels[~far_from(ma, clearance)])] = True
    keep = np.flatnonzero(~near[1:])
    keep = keep[np.argsort(-cands.peaks[keep], kind="stable")[:limit]]
    return cands.centres[keep].astype(np.int32)


def detector_candidates(fused: np.ndarray, threshold: float, fov: np.ndarray, ma: np.ndarray, limit: int) -> dict:
    """The candidate lesions of `fused` as the detector finds them, the most probable `limit` first:
    {"centres": (n, 2) scored pixels, "peaks": (n,) the map there, "touch": (n,) whether the region
    touches a microaneurysm of `ma` (the lesion-level rule of `metrics.py`: any shared pixel)}."""
    from napari_retina.models.microaneurysms import candidate_regions

    cands = candidate_regions(fused, threshold, fov)
    touch = np.zeros(len(cands) + 1, bool)
    touch[np.unique(cands.labels[np.asarray(ma, bool)])] = True
    keep = np.argsort(-cands.peaks, kind="stable")[:limit]
    return {"centres": cands.centres[keep].astype(np.int32).reshape(-1, 2),
            "peaks": cands.peaks[keep].astype(np.float32), "touch": touch[1:][keep]}


class _Mined:
    """What a detector finds on each image (`_mine`), computed once per run and cached in the run folder."""

    def __init__(self, detector_dir: str, cache: Path, key: dict, write: bool = True, say=None):
        from napari_retina.models.registry import load_model

        self.detector = load_model(detector_dir, expect="microaneurysms")  # checked (and hashed) once, here
        self.key = {"detector": str(detector_dir), "sha256": self.detector.config.get("weights_sha256"), **key,
                    **self._settings()}
        self.version = self.detector.version
        self.cache, self.write = Path(cache), write
        self.say = say or (lambda *x: None)
        self.found: dict[str, object] = {}
        if self.cache.is_file():
            saved = json.loads(self.cache.read_text())
            if saved.get("key") == self.key:
                self.found = saved["centres"]

    def _settings(self) -> dict:
        """What else decides what is mined, besides the weights (part of the cache's key)."""
        return {}

    def _mine(self, fused, fov, ma):
        raise NotImplementedError

    def _found(self, stem: str, rgb: np.ndarray, fov: np.ndarray, ma: np.ndarray):
        if stem not in self.found:
            d = self.detector
            fused = d.maps(rgb, fov, refine=False, rows=())[d.fusion]
            self.found[stem], what = self._mine(fused, fov, ma)
            self.say(f"  {stem}: {what}")
            if self.write:  # after every image: a run cut short keeps what it mined
                from napari_retina.io.atomic import atomic_write_text

                atomic_write_text(self.cache, json.dumps({"key": self.key, "centres": self.found}))
        return self.found[stem]


class HardNegatives(_Mined):
    """A detector's false-positive candidates away from every microaneurysm, per image."""

    def __init__(self, detector_dir: str, cache: Path, clearance: int, limit: int, write: bool = True, say=None):
        super().__init__(detector_dir, cache, {"clearance": clearance, "limit": limit}, write, say)
        self.clearance, self.limit = clearance, limit

    def _mine(self, fused, fov, ma):
        c = hard_negative_centres(fused, self.detector.candidate_threshold, fov, ma, self.clearance, self.limit)
        return c.tolist(), f"{len(c)} hard negatives"

    def __call__(self, stem: str, rgb: np.ndarray, fov: np.ndarray, ma: np.ndarray) -> np.ndarray:
        return np.asarray(self._found(stem, rgb, fov, ma), np.int32).reshape(-1, 2)


class DetectorCandidates(_Mined):
    """A detector's candidate lesions per image, each with its peak and whether it touches a microaneurysm."""

    def __init__(self, detector_dir: str, cache: Path, limit: int, write: bool = True, say=None):
        super().__init__(detector_dir, cache, {"candidates": True, "limit": limit}, write, say)
        self.limit = limit

    def _settings(self) -> dict:
        d = self.detector
        return {"candidate_threshold": d.candidate_threshold, "fusion": d.fusion, "fused_logit_offset": d.logit_offset}

    def _mine(self, fused, fov, ma):
        c = detector_candidates(fused, self.detector.candidate_threshold, fov, ma, self.limit)
        saved = {"centres": c["centres"].tolist(), "peaks": [round(float(v), 6) for v in c["peaks"]],
                 "touch": c["touch"].tolist()}
        return saved, f"{len(c['touch'])} candidates, {int(c['touch'].sum())} touching a microaneurysm"

    def __call__(self, stem: str, rgb: np.ndarray, fov: np.ndarray, ma: np.ndarray) -> dict:
        f = self._found(stem, rgb, fov, ma)
        return {"centres": np.asarray(f["centres"], np.int32).reshape(-1, 2),
                "peaks": np.asarray(f["peaks"], np.float32), "touch": np.asarray(f["touch"], bool)}


class PatchImage:
    """One photograph for the PRN: its enhanced pixels padded for 129-px crops, lesion and healthy centres."""

    def __init__(self, record, clearance: int, healthy: int, rng: np.random.Generator, hard=None, candidates=None):
        import cv2

        from napari_retina.fundus import field_of_view_mask
        from napari_retina.io.images import read_fundus
        from napari_retina.metrics import label_lesions
        from napari_retina.models.microaneurysms import PATCH
        from napari_retina.models.preprocess import subtract_local_background
        from napari_retina.session import graders_mask

        rgb = read_fundus(record.image)
        fov = field_of_view_mask(rgb)
        ma = graders_mask(record, LESION, rgb.shape[:2])  # unaccepted proposals are not labels
        self.labelled = ma is not None
        if ma is None:  # no label here: left out (never taken as healthy)
            ma = np.zeros(rgb.shape[:2], bool)
            fov = np.zeros_like(fov)
        self.stem = record.stem
        self.r = PATCH // 2
        self.padded = cv2.copyMakeBorder(subtract_local_background(rgb, fov), self.r, self.r, self.r, self.r,
                                         cv2.BORDER_REFLECT_101)
        self.lesion_px = np.argwhere(ma & fov).astype(np.int32)
        labels, n = label_lesions(ma & fov)
        if n:
            from scipy import ndimage

            self.lesion_centres = np.rint(np.array(ndimage.center_of_mass(ma, labels, range(1, n + 1)))).astype(np.int32)
        else:
            self.lesion_centres = np.zeros((0, 2), np.int32)
        # healthy: inside the field of view (and not at its rim), away from every microaneurysm
        far = far_from(ma, clearance)
        inner = cv2.erode(fov.astype(np.uint8), np.ones((9, 9), np.uint8)).astype(bool)
        ok = np.argwhere((far & inner)[::4, ::4]).astype(np.int32) * 4
        pick = rng.choice(len(ok), size=min(healthy, len(ok)), replace=False) if len(ok) else []
        self.healthy_px = ok[pick]
        # hard negatives: a detector's candidate lesions here that are no microaneurysm (HardNegatives)
        hard_px = hard(record.stem, rgb, fov, ma) if hard is not None and self.labelled else np.zeros((0, 2), np.int32)
        self.n_hard = len(hard_px)
        self.healthy_px = np.concatenate([self.healthy_px.reshape(-1, 2), hard_px]).astype(np.int32)
        # the detector's own decision (DetectorCandidates): its candidates that touch a microaneurysm are
        # lesion patches (beside every microaneurysm's centre, so that missed ones count too), the rest
        # hard negatives (after the random healthy locations, as above)
        self.cand = candidates(record.stem, rgb, fov, ma) if candidates is not None and self.labelled else None
        if self.cand is not None:
            t = self.cand["touch"]
            self.lesion_px = np.concatenate([self.cand["centres"][t], self.lesion_centres]).astype(np.int32)
            self.n_hard = int((~t).sum())
            self.healthy_px = np.concatenate([self.healthy_px, self.cand["centres"][~t]]).astype(np.int32)

    def patch(self, yx) -> np.ndarray:
        y, x = int(yx[0]), int(yx[1])
        return self.padded[y : y + 2 * self.r + 1, x : x + 2 * self.r + 1]


def _to_tensor(patch: np.ndarray):
    """uint8 (S, S, 3) enhanced pixels -> float32 (3, S, S), as inference prepares them (`prn_input`)."""
    import torch

    from napari_retina.models.microaneurysms import prn_input

    return torch.from_numpy(prn_input(patch[None])[0])


class TripletPatches:
    """torch Dataset of (anchor, positive, negative) patch triplets, negatives by selective sampling."""

    def __init__(self, images: list[PatchImage], sampler, length: int, augment: bool = True, seed: int = 0,
                 jitter: int = 0):
        self.images, self.sampler, self.length, self.augment, self.seed = images, sampler, int(length), augment, seed
        self.jitter = int(jitter) if augment else 0
        self.lesions = [(i, k) for i, im in enumerate(images) for k in range(len(im.lesion_px))]
        self.healthy = [(i, k) for i, im in enumerate(images) for k in range(len(im.healthy_px))]
        if not self.lesions:
            raise DataError("no microaneurysms in the training images' masks")
        if not self.healthy:
            raise DataError("no healthy field-of-view pixels in the training images")
        self.epoch = 0

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def healthy_patch(self, j: int) -> np.ndarray:
        i, k = self.healthy[j]
        return self.images[i].patch(self.images[i].healthy_px[k])

    def _at(self, image: PatchImage, yx, rng: np.random.Generator) -> np.ndarray:
        """The patch at `yx`, its centre moved by up to `jitter` pixels (inside the image)."""
        if self.jitter:
            h, w = image.padded.shape[0] - 2 * image.r, image.padded.shape[1] - 2 * image.r
            yx = np.clip(np.asarray(yx) + rng.integers(-self.jitter, self.jitter + 1, size=2), 0, [h - 1, w - 1])
        return image.patch(yx)

    def _augment(self, patch: np.ndarray, rng: np.random.Generator) -> np.ndarray:
        if not self.augment:
            return patch
        patch = np.rot90(patch, int(rng.integers(4)))
        if rng.random() < 0.5:
            patch = patch[:, ::-1]
        gain, shift = rng.uniform(0.85, 1.15), rng.uniform(-12, 12)
        return np.clip((patch.astype(np.float32) - 128.0) * gain + 128.0 + shift, 0, 255).astype(np.uint8)

    def __getitem__(self, idx: int) -> dict:
        import torch

        rng = np.random.default_rng((self.seed, self.epoch, idx))
        a, b = rng.integers(len(self.lesions), size=2)
        (ia, ka), (ib, kb) = self.lesions[a], self.lesions[b]
        neg = int(self.sampler.draw(1)[0]) if self.sampler is not None else int(rng.integers(len(self.healthy)))
        anchor = self._augment(self._at(self.images[ia], self.images[ia].lesion_px[ka], rng), rng)
        positive = self._augment(self._at(self.images[ib], self.images[ib].lesion_px[kb], rng), rng)
        negative = self._augment(self.healthy_patch(neg), rng)
        return {"image": torch.stack([_to_tensor(anchor), _to_tensor(positive), _to_tensor(negative)]),
                "negative_index": torch.tensor(neg)}


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """Area under the ROC curve of `score` for the labels `y` (0.5 where one class is missing)."""
    from sklearn.metrics import roc_auc_score

    y = np.asarray(y, bool)
    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else 0.5


def score_patches(net, patches: list[np.ndarray], device, batch: int = 64) -> np.ndarray:
    """P(microaneurysm at the centre) of each patch, in batches, as the detector scores them."""
    from napari_retina.models.microaneurysms import PatchScorer

    scorer = PatchScorer()
    scorer.setup(net, {}, device)
    out = [scorer(np.stack(patches[s : s + batch])) for s in range(0, len(patches), batch)]
    return np.concatenate(out) if out else np.zeros(0, np.float32)


def run(a: argparse.Namespace, argv: list[str]) -> int:
    import torch
    import torch.nn.functional as F

    from napari_retina.metrics import PixelPR
    from napari_retina.models.folder import load_state_dict, write_model_folder
    from napari_retina.models.registry import check_model_folder
    from napari_retina.nets.patch_classifier import PatchClassifier
    from training.losses import triplet_cosine_loss
    from training.sampling import SelectiveSampler
    from training.trainer import Trainer, is_main_process

    out = Path(a.out)
    run_dir = Path(a.run_dir) if a.run_dir else out / "run"
    say = (lambda *x: None) if a.quiet or not is_main_process() else (lambda *x: print(*x, flush=True))
    from training.trainer import RunBudget, open_run_log

    from ._main import Preparation, too_little_data

    budget = getattr(a, "budget", None) or RunBudget(a.minutes)
    records = labelled(gather_records(a.data), [LESION])  # images without a label teach nothing
    parent = check_model_folder(Path(a.init), expect="ma-prn") if a.init else None
    split_file = run_dir / "split.json"
    val_names = a.val_images
    if a.resume and split_file.is_file() and not val_names:
        val_names = json.loads(split_file.read_text())["val"]
    elif parent and not val_names:
        val_names = parents_held_out(parent, records)
    if len(records) < 2 and not val_names:
        raise too_little_data(LESION, [r.image.name for r in records])
    train_recs, val_recs = split_by_image(records, a.val_fraction, a.seed, val_names)
    if not val_recs:
        raise too_little_data(LESION, [r.image.name for r in records])
    run_dir.mkdir(parents=True, exist_ok=True)
    if is_main_process():
        write_split(split_file, train_recs, val_recs)
    log = open_run_log(run_dir, a.resume)  # the preparation's progress first, then the trainer's
    prepared = Preparation(log, budget, len(train_recs) + len(val_recs), "loading images (and mining candidates)")
    t0 = time.monotonic()
    rng = np.random.default_rng(a.seed)
    say(describe_labels(train_recs + val_recs, [LESION]))
    # Under torchrun every rank mines on its own device at the same time (no wall-clock cost, as the
    # process group only starts in Trainer.fit); only rank 0 writes the cache.
    hard = None
    if a.hard_negatives:
        hard = HardNegatives(a.hard_negatives, run_dir / "hard_negatives.json", a.clearance, a.hard_per_image,
                             write=is_main_process(), say=say)
        say(f"hard negatives: candidate lesions of detector {hard.version} away from every microaneurysm "
            f"({len(hard.found)} of {len(train_recs) + len(val_recs)} images mined before)")
    cands = None
    if a.candidates:
        cands = DetectorCandidates(a.candidates, run_dir / "candidates.json", a.hard_per_image,
                                   write=is_main_process(), say=say)
        say(f"candidates: the candidate lesions of detector {cands.version}, touching a microaneurysm or not "
            f"({len(cands.found)} of {len(train_recs) + len(val_recs)} images mined before)")
    loaded = [(PatchImage(r, a.clearance, a.healthy_per_image, rng, hard, cands), prepared(i + 1))[0]
              for i, r in enumerate(train_recs + val_recs)]
    train_imgs = [im for im in loaded[: len(train_recs)] if im.labelled]
    val_imgs = [im for im in loaded[len(train_recs):] if im.labelled]
    n_hard = (sum(im.n_hard for im in train_imgs), sum(im.n_hard for im in val_imgs))
    if not train_imgs or not any(len(im.lesion_px) for im in train_imgs):
        raise DataError(f"no training image has a microaneurysm label: {advice(LESION)}")
    sampler = SelectiveSampler(max(1, sum(len(im.healthy_px) for im in train_imgs)), seed=a.seed)
    train_set = TripletPatches(train_imgs, sampler, a.samples_per_epoch, augment=True, seed=a.seed, jitter=a.jitter)
    val_pos = [im.patch(c) for im in val_imgs for c in im.lesion_centres]
    val_neg = [im.patch(c) for im in val_imgs for c in im.healthy_px]
    # which of them are hard negatives (each image's last `n_hard`): scored apart as well
    val_hard = np.concatenate([np.arange(len(im.healthy_px)) >= len(im.healthy_px) - im.n_hard for im in val_imgs]
                              ) if val_imgs else np.zeros(0, bool)
    if not val_pos:
        raise DataError(f"no microaneurysms in the validation images' masks: {advice(LESION)}")
    # the detector's validation candidates (with --candidates): the decision the PRN is there to make
    val_cand = [im.patch(c) for im in val_imgs for c in im.cand["centres"]] if cands is not None else []
    val_cand_peak = np.concatenate([im.cand["peaks"] for im in val_imgs]) if val_cand else np.zeros(0)
    val_cand_true = np.concatenate([im.cand["touch"] for im in val_imgs]) if val_cand else np.zeros(0, bool)
    if cands is not None:
        if not (val_cand_true.any() and (~val_cand_true).any()):
            raise DataError("the detector's validation candidates need some that touch a microaneurysm and some that "
                            f"do not (it found {len(val_cand)}, {int(val_cand_true.sum())} touching)")
        say(f"validation candidates: {len(val_cand)}, {int(val_cand_true.sum())} touching a microaneurysm; "
            f"ranked by the map's peak alone: ROC AUC {roc_auc(val_cand_true, val_cand_peak):.3f}")
    say(f"{len(train_imgs)} training images ({len(train_set.lesions)} microaneurysm pixels, {len(train_set.healthy)} "
        f"healthy locations, {n_hard[0]} of them hard), {len(val_imgs)} validation images ({len(val_pos)} "
        f"microaneurysms, {len(val_neg)} healthy, {n_hard[1]} hard); loaded in {time.monotonic() - t0:.0f} s")

    from training.trainer import seed_everything

    seed_everything(a.seed)  # the same seed gives the same initial weights, hence the same run
    net = PatchClassifier(widths=tuple(a.widths))
    if a.init:
        try:
            net.load_state_dict(load_state_dict(Path(a.init)), strict=True)
        except RuntimeError as e:
            raise RetinaInputError(f"--init {a.init}: weights do not fit this network ({str(e).splitlines()[0]})") from None

    def forward_fn(model, batch):
        x = batch["image"]  # (B, 3, C, S, S): anchor, positive, negative
        b = x.shape[0]
        logits, emb = model(x.flatten(0, 1), return_embedding=True)
        return logits.view(b, 3), emb.view(b, 3, -1)

    def loss_fn(outputs, batch):
        logits, emb = outputs
        # cross-entropy between the anchor (a microaneurysm) and the negative (healthy), as the paper pairs them
        ce = F.binary_cross_entropy_with_logits(
            torch.cat([logits[:, 0], logits[:, 2]]).float(),
            torch.cat([torch.ones_like(logits[:, 0]), torch.zeros_like(logits[:, 2])]).float())
        if a.loss == "ce":
            return ce
        return ce + triplet_cosine_loss(emb[:, 0], emb[:, 1], emb[:, 2], margin=a.margin)

    from napari_retina.models.microaneurysms import PRN_RULES

    rule = PRN_RULES[a.rule]
    rule_t = np.float32(cands.detector.candidate_threshold) if cands is not None else np.float32(0.5)

    def val_fn(model, _val, device) -> dict:
        p = score_patches(model, val_pos + val_neg, device)
        y = np.r_[np.ones(len(val_pos), bool), np.zeros(len(val_neg), bool)]
        def aupr_of(keep):
            pr = PixelPR()
            pr.add(np.round(p[keep] * 255).astype(np.uint8), y[keep])
            v = pr.aupr()
            return 0.0 if np.isnan(v) else v

        out = {"aupr": aupr_of(np.ones(len(p), bool)), "sensitivity_at_half": float((p[y] >= 0.5).mean()),
               "specificity_at_half": float((p[~y] < 0.5).mean())}
        if val_hard.any():  # microaneurysms against the detector's false positives alone: the PRN's real task
            out["aupr_hard"] = aupr_of(np.r_[np.ones(len(val_pos), bool), val_hard])
        if val_cand:  # the detector's candidates, ranked by the score and by --rule
            s = score_patches(model, val_cand, device)
            out["cand_auc"] = roc_auc(val_cand_true, s)
            out["cand_auc_rule"] = roc_auc(val_cand_true, rule(val_cand_peak, s, rule_t))
        return out

    def refresh(trainer, metrics):
        """Selective sampling: score part of the healthy pool; its loss becomes its drawing weight."""
        if int(metrics["epoch"]) % a.refresh_every:
            return
        k = min(a.refresh_size, sampler.n)
        idx = np.random.default_rng((a.seed, int(metrics["epoch"]))).choice(sampler.n, size=k, replace=False)
        p = score_patches(trainer.module, [train_set.healthy_patch(int(j)) for j in idx], trainer.device)
        sampler.update(idx, -np.log(np.clip(1.0 - p, 1e-6, 1.0)))

    info = {
        "version": a.version or datetime.date.today().strftime("%Y.%m.%d-ma-prn"),
        "data": data_names(a.data),
        "validation_images": [r.image.name for r in val_recs],
        "train_count": len(train_imgs),
        "command": portable_command("python -m training ma-prn", argv),
        "parent": parent_record(parent),
        "ema_decay": a.ema,
        "parent_training": dict(parent.get("training", {})) if parent else None,
        "torch": torch.__version__,
        "hard_negatives": None if hard is None else {
            "detector": hard.version, "weights_sha256": hard.detector.config.get("weights_sha256"), "per_image": a.hard_per_image,
            "training": n_hard[0], "validation": n_hard[1]},
        "candidates": None if cands is None else {
            "detector": cands.version, "weights_sha256": cands.detector.config.get("weights_sha256"), "per_image": a.hard_per_image,
            "training": [sum(int(im.cand["touch"].sum()) for im in train_imgs),
                         sum(len(im.cand["touch"]) for im in train_imgs)],
            "validation": [int(val_cand_true.sum()), len(val_cand_true)],
            "val_auc_peak": round(roc_auc(val_cand_true, val_cand_peak), 4)},
    }

    def export(trainer, metrics):
        if not metrics["is_best"]:
            return
        state = {k: v.detach().cpu() for k, v in trainer.eval_module.state_dict().items()}
        prev = info["parent_training"] or {}
        config = {
            "model": "ma-prn",
            "lesion": LESION,
            "version": info["version"],
            "net": trainer.module.config(),
            "preprocess": "enhance",
            "validation_images": info["validation_images"],
            "training": {
                "epochs": int(prev.get("epochs", 0)) + int(metrics["epoch"]),
                "minutes": round(float(prev.get("minutes", 0.0)) + trainer.training_seconds / 60, 1),
                "device": str(trainer.device),
                "precision": precision(trainer),
                "ema_decay": info["ema_decay"],
                "loss": "cosine triplet (margin %g) + cross-entropy" % a.margin if a.loss == "triplet" else "cross-entropy",
                "val_patch_aupr": round(float(metrics.get("val_aupr", float("nan"))), 4),
                "val_patch_aupr_hard": round(float(metrics["val_aupr_hard"]), 4) if "val_aupr_hard" in metrics else None,
                "selective_sampling": f"refreshed every {a.refresh_every} epochs, {a.refresh_size} healthy patches",
                "hard_negatives": info["hard_negatives"],
                "candidates": info["candidates"],
                "val_candidate_auc": round(float(metrics["val_cand_auc"]), 4) if "val_cand_auc" in metrics else None,
                "val_candidate_auc_rule": (round(float(metrics["val_cand_auc_rule"]), 4)
                                           if "val_cand_auc_rule" in metrics else None),
                "jitter": a.jitter,
                "rule": a.rule if cands is not None else None,
                "early_stopping_patience": a.patience,
                "data": info["data"],
                "command": info["command"],
                "paths": PATH_RULE,
                "parent": info["parent"],
                "trained": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds"),
            },
        }
        t = config["training"]
        h = info["hard_negatives"]
        if info["candidates"]:
            hard_line = "the detector's candidates that touch no microaneurysm (below)"
        elif h is None:
            hard_line = "none (random healthy locations only)"
        else:
            hard_line = (f"the candidate lesions of detector {h['detector']} that touch no microaneurysm, at most "
                         f"{h['per_image']} per image: {h['training']} in the training pool, {h['validation']} "
                         "in validation")
        hard_val = "" if t["val_patch_aupr_hard"] is None else f"; against the hard negatives alone {t['val_patch_aupr_hard']:.3f}"
        c = info["candidates"]
        cand_line = "" if c is None else (
            f"\n- Trained on the decision of detector {c['detector']}: its candidate lesions that touch a "
            f"microaneurysm ({c['training'][0]} of {c['training'][1]} on the training images, with every "
            f"microaneurysm's centre) against those that do not (and random healthy locations); patch centres "
            f"moved by up to {a.jitter} px\n- Validation candidates ({c['validation'][0]} of {c['validation'][1]} "
            f"touching a microaneurysm) ranked by ROC AUC: the map's peak alone {c['val_auc_peak']:.3f}, the PRN's "
            f"score {t['val_candidate_auc']:.3f}, the rule {a.rule} ({PRN_RULE_NAMES[a.rule]}) "
            f"{t['val_candidate_auc_rule']:.3f} (early stopping)")
        card = f"""# Microaneurysm patch-wise refinement network {config['version']}

Scores 129 x 129 patches of the contrast-enhanced photograph: P(the centre pixel is a
microaneurysm). A slim residual network (widths {'-'.join(map(str, a.widths))}, {trainer.module.num_parameters():,}
parameters) trained from scratch by napari-retina {__version__} with {t['loss']}.

- Data: {', '.join(info['data'])} ({info['train_count']} training images, {len(config['validation_images'])} validation images)
- Triplets: {a.samples_per_epoch} per epoch, batch {a.batch_size}, Adam lr {a.lr}{ema_text(a.ema)}; negatives by selective sampling ({t['selective_sampling']})
- Epochs: {t['epochs']}, {t['minutes']:.0f} min on {t['device']} ({platform.machine()}, torch {info['torch']}){', ' + t['precision'] if t.get('precision') else ''}
- Hard negatives: {hard_line}{cand_line}
- Validation: patch-level AUPR {t['val_patch_aupr']:.3f} (every microaneurysm of the validation images against their healthy locations{' and hard negatives' if hard or cands else ''}){hard_val}; patience {a.patience}
- Parent model: {parent_text(t['parent'])}
- Command: `{t['command']}` ({PATH_RULE})

Validation images (held out by image): {', '.join(config['validation_images'])}

weights.safetensors SHA-256: {{sha256}}
"""
        write_model_folder(out, state, config, card)

    trainer = Trainer(
        net, loss_fn, train_set, None, run_dir, **optimisation_kwargs(a),
        device=a.device, batch_size=a.batch_size, lr=a.lr, epochs=a.epochs, minutes=a.minutes,
        seed=a.seed, val_fn=val_fn, monitor="val_cand_auc_rule" if cands is not None else "val_aupr", mode="max",
        lr_patience=max(1, a.patience // 2), early_stop_patience=a.patience, forward_fn=forward_fn,
        on_epoch_end_every_rank=[refresh], on_epoch_end=[export], info={k: info[k] for k in ("version", "data", "command")},
        verbose=not a.quiet, budget=budget, log=log,
    )
    summary = trainer.fit(resume=a.resume)
    say_end(say, summary, out, f"candidate ROC AUC ({a.rule}) {{:.3f}}" if cands is not None else "patch AUPR {:.3f}")
    return 0


def main(argv: list[str] | None = None) -> int:
    from ._main import recipe_main

    return recipe_main("ma-prn", build_parser, _validate_args, run, argv)
