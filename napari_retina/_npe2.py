"""Thin npe2 entry points named in napari.yaml: reader, Labels writer, sample data.

napari is imported lazily (only to show a notification), so this module
imports headless.
"""

from __future__ import annotations

from pathlib import Path

import numpy as np

from .io.datasets import ImageRecord, open_dataset, parse_mask_name, parse_prob_name
from .io.errors import RetinaInputError
from .io.images import IMAGE_EXTENSIONS, is_image_path
from .io.masks import MASK_EXTENSIONS, read_mask, write_mask
from .lesions import confirmed_pixels, lesion, lesion_for_layer_name
from .session import META_KEY, layer_data, open_record

NULL_LAYER = [(None,)]  # napari's "read fine, nothing to show" sentinel


def notify_error(message: str) -> None:
    """One clear napari notification (or stderr without napari)."""
    try:
        from napari.utils.notifications import show_error
    except ImportError:  # headless use
        import sys

        print(f"napari-retina: {message}", file=sys.stderr)
        return
    show_error(message)


def _single_path(path) -> str | None:
    if isinstance(path, (list, tuple)):
        if len(path) != 1:
            return None  # stacks of fundus photographs are not a thing
        path = path[0]
    return str(path)


def get_reader(path):
    """Reader for fundus images, lesion masks and data-set/project folders; None otherwise."""
    p = _single_path(path)
    if p is None:
        return None
    pp = Path(p)
    if pp.is_dir():
        try:
            dataset = open_dataset(pp)
        except OSError:
            return None
        if dataset is None:
            return None
        return _dataset_reader
    if not is_image_path(pp):
        return None
    if parse_mask_name(pp.name) is not None and pp.suffix.lower() in MASK_EXTENSIONS:
        return _mask_reader
    if parse_prob_name(pp.name) is not None:
        return _prob_reader
    return _image_reader


def _image_reader(path):
    p = Path(_single_path(path))
    record = _record_for_image(p)
    return _read_record(record, dataset=None)


def _record_for_image(image: Path) -> ImageRecord:
    """The image's record in its folder (so flat-layout masks beside it are found)."""
    from .io.datasets import IDRID_IMAGES

    # an image of the official layout finds its masks two folders up
    folder = image.parent.parent.parent if image.parent.parent.name == IDRID_IMAGES else image.parent
    try:
        dataset = open_dataset(folder)
    except OSError:
        dataset = None
    if dataset is not None:
        i = dataset.index_of(image)
        if i >= 0:
            return dataset.records[i]
    return ImageRecord(image=image)


def _dataset_reader(path):
    p = Path(_single_path(path))
    dataset = open_dataset(p)
    if dataset is None:
        notify_error(f"{p}: no fundus images found")
        return NULL_LAYER
    return _read_record(dataset.records[0], dataset=dataset)


def _read_record(record: ImageRecord, dataset=None, project_root=None):
    try:
        opened = open_record(record, project_root=project_root, dataset=dataset)
    except RetinaInputError as e:
        notify_error(str(e))
        return NULL_LAYER
    if opened.annotation.notes:  # e.g. a mask of the wrong size: left out, the rest opens
        notify_error("; ".join(opened.annotation.notes))
    return layer_data(opened)


def _mask_reader(path):
    p = Path(_single_path(path))
    stem, code = parse_mask_name(p.name)
    try:
        mask = read_mask(p)
    except RetinaInputError as e:
        notify_error(str(e))
        return NULL_LAYER
    les = lesion(code)
    from .session import labels_colormap

    data = mask.astype(np.uint8) * np.uint8(les.label)
    meta = {META_KEY: {"role": "mask", "lesion": code, "image": None}}
    return [(data, {"name": f"{stem} {les.layer_name}", "colormap": labels_colormap(code), "metadata": meta}, "labels")]


def _prob_reader(path):
    """A segmenter's probability map (`<stem>_<LESION>_prob.tif`, uint8 0-255): a translucent overlay."""
    from PIL import Image

    p = Path(_single_path(path))
    stem, code = parse_prob_name(p.name)
    try:
        with Image.open(p) as im:
            data = np.asarray(im)
    except (OSError, ValueError) as e:
        notify_error(f"{p}: not a readable probability map ({e})")
        return NULL_LAYER
    if data.ndim != 2:
        notify_error(f"{p}: a probability map has one channel, this file has shape {data.shape}")
        return NULL_LAYER
    les = lesion(code)
    meta = {META_KEY: {"role": "probability", "lesion": code, "image": None}}
    kw = {"name": f"{stem} {les.code} probability", "colormap": "magma", "contrast_limits": (0, 255),
          "opacity": 0.6, "blending": "additive", "metadata": meta}
    return [(data, kw, "image")]


def write_labels(path: str, data, meta: dict) -> list[str]:
    """Save a Labels layer as a binary lesion mask (1-bit palette TIFF or PNG).

    A lesion layer (ours, by its metadata or its name) holds the grader's confirmed pixels
    (`Lesion.label`) and pending model proposals (`Lesion.pending_label`): only the confirmed
    ones are written, as in the project folder. Any other Labels layer: every non-zero pixel.
    """
    p = Path(path)
    if p.suffix.lower() not in MASK_EXTENSIONS:
        p = p.with_suffix(".tif")
    pixels = confirmed_pixels(data) if _is_lesion_layer(meta) else np.asarray(data) != 0
    try:
        write_mask(p, pixels)
    except RetinaInputError as e:
        notify_error(str(e))
        return []
    return [str(p)]


def _is_lesion_layer(meta: dict | None) -> bool:
    meta = meta or {}
    info = (meta.get("metadata") or {}).get(META_KEY) or {}
    if info.get("role") in ("lesion", "mask"):
        return True
    return lesion_for_layer_name(str(meta.get("name", ""))) is not None


# --- sample data ---------------------------------------------------------------------


def samples_dir() -> Path:
    """Where sample projects are saved (the installed package may be read-only): the user's
    napari-retina data folder, as for model versions (`$NAPARI_RETINA_DATA` when set)."""
    from .models.versions import data_root

    d = data_root() / "samples"
    d.mkdir(parents=True, exist_ok=True)
    return d


def sample_idrid():
    from .sample_data import idrid_sample_masks, idrid_sample_path

    record = ImageRecord(image=idrid_sample_path(), masks=idrid_sample_masks())
    return _read_record(record, project_root=samples_dir())


def _skimage_sample(name: str):
    import skimage.data

    from .io.atomic import atomic_path

    target = samples_dir() / f"{name}.png"
    if not target.exists():
        import cv2

        img = np.asarray(getattr(skimage.data, name)())
        if img.ndim == 3:
            img = cv2.cvtColor(img[..., :3], cv2.COLOR_RGB2BGR)
        with atomic_path(target) as tmp:
            if not cv2.imwrite(str(tmp), img):  # cv2 reports failure by its return value
                raise RetinaInputError(f"cannot write the {name} sample to {target}")
    return _read_record(ImageRecord(image=target), project_root=samples_dir())


def sample_retina():
    return _skimage_sample("retina")


def sample_microaneurysms():
    return _skimage_sample("microaneurysms")


__all__ = [
    "IMAGE_EXTENSIONS",
    "get_reader",
    "write_labels",
    "sample_idrid",
    "sample_retina",
    "sample_microaneurysms",
]
