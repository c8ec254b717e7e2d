"""Training data from IDRiD-layout folders and annotation project folders, split by image.

Images and masks are held in memory once (a 4288x2848 image is 36 MB); patches
are cut on the fly with one affine warp each, so augmentation (shift, scale,
rotation) costs no more than a plain crop.
"""

from __future__ import annotations

import hashlib
import json
from dataclasses import dataclass, field
from pathlib import Path

import numpy as np

from napari_retina.io.datasets import ImageRecord, open_dataset
from napari_retina.io.ellipses import Ellipse
from napari_retina.io.images import read_fundus
from napari_retina.io.masks import read_mask
from napari_retina.lesions import REFINED_LESIONS as REFINER_LESIONS  # the one definition


class DataError(ValueError):
    """A data problem the user can fix (no images, unknown validation image...)."""


def gather_records(folders: list[str | Path]) -> list[ImageRecord]:
    """Every image of the given IDRiD-layout, flat or project folders, in a stable order."""
    records: list[ImageRecord] = []
    for folder in folders:
        folder = Path(folder)
        if not folder.is_dir():
            raise DataError(f"{folder}: not a folder")
        ds = open_dataset(folder)
        if ds is None:
            raise DataError(f"{folder}: no fundus images found")
        records.extend(ds.records)
    seen: set[str] = set()
    for r in records:
        if r.stem in seen:
            raise DataError(f"image {r.stem} appears twice in the training folders")
        seen.add(r.stem)
    return records


def parents_held_out(parent_config: dict | None, records: list[ImageRecord]) -> list[str] | None:
    """The parent model's validation images that are in this data (fine-tuning keeps them held out).

    None when the parent names none of them (e.g. a clinic's own folder fine-tuning the shipped
    model): the run then splits its data afresh.
    """
    if not parent_config:
        return None
    names = parent_config.get("validation_images") or []
    here = {r.stem for r in records}
    kept = [n for n in names if Path(n).stem in here]
    return kept or None


def split_by_image(
    records: list[ImageRecord], val_fraction: float = 0.2, seed: int = 0, val_names: list[str] | None = None
) -> tuple[list[ImageRecord], list[ImageRecord]]:
    """Hold out whole images (never patches of a training image) for validation."""
    if val_names:
        wanted = {Path(n).stem for n in val_names}
        unknown = wanted - {r.stem for r in records}
        if unknown:
            raise DataError(f"validation images not in the data: {', '.join(sorted(unknown))}")
        val = [r for r in records if r.stem in wanted]
    else:
        order = sorted(records, key=lambda r: r.stem)
        # a hash of the names, not the list order, decides: adding folders does not reshuffle
        keyed = sorted(order, key=lambda r: hashlib.sha256(f"{seed}:{r.stem}".encode()).hexdigest())
        n_val = max(1, round(len(records) * val_fraction)) if len(records) > 1 else 0
        val = sorted(keyed[:n_val], key=lambda r: r.stem)
    val_stems = {r.stem for r in val}
    train = [r for r in records if r.stem not in val_stems]
    if not train:
        raise DataError("no training images left after the validation split")
    return train, val


@dataclass
class LoadedImage:
    stem: str
    rgb: np.ndarray
    masks: dict[str, np.ndarray] = field(default_factory=dict)  # only lesions present


def load_image(record: ImageRecord, lesions=REFINER_LESIONS) -> LoadedImage:
    """Pixels and labels of one record (session.graders_masks: a reviewed lesion of its annotation
    project gives the grader's own pixels, never unaccepted proposals; else the data set's
    ground truth; a lesion with neither is left out)."""
    from napari_retina.session import graders_masks

    rgb = read_fundus(record.image)
    out = LoadedImage(record.stem, rgb)
    for code, m in graders_masks(record, list(lesions), rgb.shape[:2]).items():
        if m is not None and m.any():
            out.masks[code] = m
    return out


def describe_labels(records: list[ImageRecord], lesions) -> str:
    """One line: how many image-lesion pairs take their labels from reviewed projects, from ground
    truth, and are left out (printed by every recipe before it trains)."""
    from collections import Counter

    from napari_retina.session import label_source

    n = Counter(label_source(r, code) for r in records for code in lesions)
    return (f"labels ({', '.join(lesions)}): {n['reviewed']} image-lesion pairs from reviewed projects, "
            f"{n['ground truth']} from ground truth, {n['left out']} left out")


def labelled(records: list[ImageRecord], lesions) -> list[ImageRecord]:
    """The records with a label for at least one of `lesions` (a reviewed project's, or ground truth):
    only those can be trained or validated on (`session.label_source`; no pixel is read)."""
    from napari_retina.session import label_source

    return [r for r in records if any(label_source(r, code) != "left out" for code in lesions)]


def write_split(path: Path, train: list[ImageRecord], val: list[ImageRecord]) -> None:
    from napari_retina.io.atomic import atomic_write_text

    # atomic: under torchrun the other processes may read it while the first one writes
    atomic_write_text(
        path, json.dumps({"train": [r.image.name for r in train], "val": [r.image.name for r in val]}, indent=1) + "\n"
    )


@dataclass
class RefinerSample:
    image: int  # index into the loaded images
    ellipse: Ellipse


def simulate_samples(images: list[LoadedImage], reduction: float, seed: int, lesions=REFINER_LESIONS) -> list[RefinerSample]:
    """Coarse ellipses simulated from the fine masks (paper 3.1), one sample per ellipse."""
    from napari_retina.coarse import simulate_coarse_ellipses

    samples = []
    for i, img in enumerate(images):
        for code in lesions:
            if code in img.masks:
                for e in simulate_coarse_ellipses(img.masks[code], code, reduction=reduction, seed=seed + i):
                    samples.append(RefinerSample(i, e))
    return samples


class RefinerPatches:
    """torch Dataset of (image patch, coarse mask, target) around simulated ellipses.

    The target is the fine mask inside the ellipse: a refined mask never leaves
    the ellipse a grader drew. With `augment`, each patch gets a random
    shift-scale-rotate, blur and brightness-contrast (paper 3.1).
    """

    def __init__(
        self, images, samples, geom, augment: bool, seed: int = 0, length: int | None = None, ellipse_jitter: float = 0.2
    ):
        self.images, self.samples, self.geom, self.augment = images, samples, geom, augment
        # graders draw tighter or looser than the simulator: vary each semi-axis by up to this fraction
        self.ellipse_jitter = float(ellipse_jitter)
        self.seed = seed
        self.length = length or len(samples)
        self.epoch = 0
        # class-balanced drawing when an epoch is a fixed number of random samples
        by_lesion: dict[str, list[int]] = {}
        for k, s in enumerate(samples):
            by_lesion.setdefault(s.ellipse.lesion, []).append(k)
        self.by_lesion = [np.array(v) for _, v in sorted(by_lesion.items())]

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def _pick(self, idx: int, rng) -> RefinerSample:
        if self.length == len(self.samples) and not self.augment:
            return self.samples[idx]
        group = self.by_lesion[rng.integers(len(self.by_lesion))]
        return self.samples[int(group[rng.integers(len(group))])]

    def _window(self, e: Ellipse, rng, tries: int = 8):
        """(transform, coarse mask) of one `size` window of a large ellipse at `max_scale`.

        Inference covers such an ellipse with windows at exactly that scale; here each sample is
        one of them, centred on a random point of the ellipse and turned at random. A window
        with no pixel outside the ellipse has no background prototype, so a few are redrawn.
        """
        from napari_retina.models.patches import coarse_patch, similarity_transform

        size = self.geom.size
        px = self.geom.max_scale * (rng.uniform(0.85, 1.0) if self.augment else 1.0)
        th = np.deg2rad(e.angle_deg)
        for _ in range(tries):
            # a uniform point of the ellipse: radius sqrt(u) in the unit disc, then the ellipse's axes
            r, phi = np.sqrt(rng.random()), rng.uniform(0, 2 * np.pi)
            u, v = r * np.cos(phi) * e.semi_axes[0], r * np.sin(phi) * e.semi_axes[1]
            centre = (e.center_xy[0] + u * np.cos(th) - v * np.sin(th), e.center_xy[1] + u * np.sin(th) + v * np.cos(th))
            rot = float(rng.uniform(-180, 180)) if self.augment else 0.0
            m = similarity_transform(centre, px, rot, (size, size))
            coarse = coarse_patch(e, m, size)
            if coarse.mean() < 0.97:
                break
        return m, coarse

    def __getitem__(self, idx: int) -> dict:
        import cv2
        import torch

        from napari_retina.models.patches import coarse_patch, natural_side, patch_transform, warp_image, warp_mask
        from napari_retina.models.refiner import normalise_patch

        rng = np.random.default_rng([self.seed, self.epoch, idx])
        s = self._pick(idx, rng)
        img = self.images[s.image]
        size = self.geom.size
        e = s.ellipse
        if self.augment and self.ellipse_jitter > 0 and rng.random() < 0.5:
            j = self.ellipse_jitter
            e = Ellipse(
                e.lesion,
                e.center_xy,
                tuple(max(1.0, a * rng.uniform(1 - j, 1 + j)) for a in e.semi_axes),
                (e.angle_deg + rng.uniform(-15, 15)) % 360,
            )
        scale = float(np.exp(rng.uniform(np.log(0.8), np.log(1.25)))) if self.augment else 1.0
        if natural_side(e, self.geom) * scale / size > self.geom.max_scale:
            # larger than one patch at the training scale: a window of it, as inference sees it
            m, coarse = self._window(e, rng)
        elif self.augment:
            m = patch_transform(
                e,
                self.geom,
                scale=scale,
                rotation_deg=float(rng.uniform(-180, 180)),
                shift=tuple(rng.uniform(-0.08, 0.08, 2)),
            )
            coarse = coarse_patch(e, m, size)
        else:
            m = patch_transform(e, self.geom)
            coarse = coarse_patch(e, m, size)
        patch = warp_image(img.rgb, m, size)
        target = warp_mask(img.masks[e.lesion], m, size) & coarse
        if self.augment:
            if rng.random() < 0.3:
                patch = cv2.GaussianBlur(patch, (0, 0), float(rng.uniform(0.5, 1.5)))
            if rng.random() < 0.5:
                alpha, beta = rng.uniform(0.8, 1.2), rng.uniform(-20, 20)
                patch = np.clip(patch.astype(np.float32) * alpha + beta, 0, 255).astype(np.uint8)
        return {
            "image": torch.from_numpy(normalise_patch(patch)),
            "mask": torch.from_numpy(coarse[None].astype(np.float32)),
            "target": torch.from_numpy(target[None].astype(np.float32)),
            "lesion": e.lesion,
        }


# ---- whole-image segmenters (exudates): patches at the model's working scale ----------------------


@dataclass
class ScaledImage:
    """One image at a segmenter's working scale, prepared exactly as inference prepares it."""

    stem: str
    x: np.ndarray  # float32 (3, h, w): models.segmenter.network_input
    fov: np.ndarray  # bool (h, w)
    target: np.ndarray  # float32 (h, w): the lesion fraction of each working pixel (soft at edges)
    lesion_px: np.ndarray  # int32 (n, 2) working pixels with target >= 0.5, for lesion-centred patches


def load_scaled(record: ImageRecord, lesion: str, scale: float, preprocess: str = "none",
                dtype=np.float32) -> ScaledImage | None:
    """An image and its lesion label at `scale` (`session.graders_masks`), or None when it has none.

    The image is the network's input (`network_input`: `preprocess`, standardised over the
    field of view); float16 (`dtype`) halves the memory of full-scale images (patches are
    turned into float32 when drawn).
    """
    import cv2

    from napari_retina.fundus import field_of_view_mask
    from napari_retina.models.segmenter import network_input

    from napari_retina.session import graders_mask

    rgb = read_fundus(record.image)
    full = graders_mask(record, lesion, rgb.shape[:2])  # a project's unaccepted proposals are not labels
    if full is None:
        return None  # no label for this lesion here: left out, never a negative
    fov_full = field_of_view_mask(rgb)
    x, fov = network_input(rgb, fov_full, scale, preprocess, dtype=dtype)
    h, w = fov.shape
    # area averaging keeps a 1-px exudate as a 0.25 target at half scale instead of erasing it
    target = full.astype(np.float32) if (h, w) == full.shape else cv2.resize(
        full.astype(np.float32), (w, h), interpolation=cv2.INTER_AREA)
    lesion_px = np.argwhere((target >= 0.5) & fov).astype(np.int32)
    return ScaledImage(record.stem, x, fov, target, lesion_px)


class SegmentationPatches:
    """torch Dataset of `size` x `size` patches at the working scale, half centred on lesion pixels.

    Balanced as the patch-based paper samples (lesion and non-lesion patches alike); the rest
    are drawn uniformly from the field of view. Augmentation: flips, quarter turns, and a
    per-channel gain and offset in the standardised space (brightness, contrast and hue, as
    a colour jitter of the photograph would move them).
    """

    def __init__(self, images: list[ScaledImage], size: int = 256, augment: bool = True, seed: int = 0,
                 length: int = 1000, lesion_fraction: float = 0.5):
        self.images, self.size, self.augment, self.seed = images, int(size), augment, seed
        self.length, self.lesion_fraction = int(length), float(lesion_fraction)
        self.epoch = 0
        self.with_lesion = [i for i, im in enumerate(images) if len(im.lesion_px)]
        self.fov_px = [np.argwhere(im.fov[:: 8, :: 8]).astype(np.int32) * 8 for im in images]

    def __len__(self) -> int:
        return self.length

    def set_epoch(self, epoch: int) -> None:
        self.epoch = epoch

    def __getitem__(self, idx: int) -> dict:
        import torch

        rng = np.random.default_rng([self.seed, self.epoch, idx])
        if self.with_lesion and rng.random() < self.lesion_fraction:
            im = self.images[self.with_lesion[rng.integers(len(self.with_lesion))]]
            cy, cx = im.lesion_px[rng.integers(len(im.lesion_px))]
        else:
            k = int(rng.integers(len(self.images)))
            im = self.images[k]
            pts = self.fov_px[k]
            cy, cx = pts[rng.integers(len(pts))] if len(pts) else (im.fov.shape[0] // 2, im.fov.shape[1] // 2)
        s = self.size
        h, w = im.fov.shape
        # a random offset of the centre inside the patch, clamped to the image (padded if smaller)
        y0 = int(np.clip(cy - rng.integers(s // 8, s - s // 8), 0, max(h - s, 0)))
        x0 = int(np.clip(cx - rng.integers(s // 8, s - s // 8), 0, max(w - s, 0)))
        x = np.zeros((3, s, s), np.float32)
        t = np.zeros((s, s), np.float32)
        f = np.zeros((s, s), np.float32)
        ph, pw = min(s, h - y0), min(s, w - x0)
        x[:, :ph, :pw] = im.x[:, y0 : y0 + ph, x0 : x0 + pw]
        t[:ph, :pw] = im.target[y0 : y0 + ph, x0 : x0 + pw]
        f[:ph, :pw] = im.fov[y0 : y0 + ph, x0 : x0 + pw]
        if self.augment:
            k = int(rng.integers(4))
            flip = rng.random() < 0.5
            x, t, f = (np.rot90(a, k, axes=(-2, -1)) for a in (x, t, f))
            if flip:
                x, t, f = (a[..., ::-1] for a in (x, t, f))
            gain = rng.uniform(0.85, 1.15) * rng.uniform(0.95, 1.05, 3)  # contrast, then hue per channel
            offset = rng.uniform(-0.2, 0.2) + rng.uniform(-0.05, 0.05, 3)  # brightness, then hue
            x = (x * gain[:, None, None] + offset[:, None, None]) * (f > 0)
        return {
            "image": torch.from_numpy(np.ascontiguousarray(x, np.float32)),
            "target": torch.from_numpy(np.ascontiguousarray(t, np.float32)[None]),
            "fov": torch.from_numpy(np.ascontiguousarray(f, np.float32)[None]),
        }
