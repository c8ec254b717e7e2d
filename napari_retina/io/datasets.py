"""Folders of fundus images: the official IDRiD layout, the flat layout, annotation projects.

A data set is an ordered list of `ImageRecord`s; every tool (reader, dock,
CLI, training) walks folders through `open_dataset`.
"""

from __future__ import annotations

import re
from dataclasses import dataclass, field
from pathlib import Path

from ..lesions import LESION_CODES
from .images import IMAGE_EXTENSIONS

IDRID_IMAGES = "1. Original Images"
IDRID_MASKS = "2. All Segmentation Groundtruths"
IDRID_SPLITS = ("a. Training Set", "b. Testing Set")
PROJECT_SUFFIX = ".retina"
# a flat folder may name which lesions of which image are labels (a training bundle does):
# {"labels": {stem: [codes]}}; a lesion not named there has no label, file or not
LABELS_MANIFEST = "labels.json"
MASK_SUFFIXES = (".tif", ".tiff", ".png")

_MASK_NAME = re.compile(
    r"^(?P<stem>.+)_(?P<code>" + "|".join(LESION_CODES) + r")\.(tif|tiff|png)$", re.IGNORECASE
)


# a segmenter's probability map (uint8 0-255) written beside its mask: never a fundus image
_PROB_NAME = re.compile(
    r"^(?P<stem>.+)_(?P<code>" + "|".join(LESION_CODES) + r")_prob\.(tif|tiff|png)$", re.IGNORECASE
)


@dataclass
class ImageRecord:
    """One fundus image of a data set and where its lesion masks are."""

    image: Path
    masks: dict[str, Path] = field(default_factory=dict)  # lesion code -> mask file
    project: Path | None = None  # set when the image lives inside an annotation project
    # the lesions its data set annotates (IDRiD convention: for these, no mask file means no
    # lesion); a lesion outside it has no ground truth here
    truth: frozenset = frozenset()

    @property
    def stem(self) -> str:
        return self.image.stem


@dataclass
class Dataset:
    root: Path
    layout: str  # "idrid", "flat" or "project"
    records: list[ImageRecord]

    def __len__(self) -> int:
        return len(self.records)

    def index_of(self, image: str | Path) -> int:
        """Position of an image (path, or file name) in the data set, -1 if absent."""
        p = Path(image)
        for i, r in enumerate(self.records):
            if _same(r.image, p):
                return i
        for i, r in enumerate(self.records):
            if r.image.name == p.name:
                return i
        return -1


def _same(a: Path, b: str | Path) -> bool:
    try:
        return Path(a).resolve() == Path(b).resolve()
    except OSError:
        return False


def parse_mask_name(name: str) -> tuple[str, str] | None:
    """("IDRiD_01", "EX") for "IDRiD_01_EX.tif", None for anything that is not a mask name."""
    m = _MASK_NAME.match(name)
    if m is None:
        return None
    return m.group("stem"), m.group("code").upper()


def parse_prob_name(name: str) -> tuple[str, str] | None:
    """("IDRiD_01", "EX") for "IDRiD_01_EX_prob.tif" (a segmenter's probability map), else None."""
    m = _PROB_NAME.match(name)
    if m is None:
        return None
    return m.group("stem"), m.group("code").upper()


def _natural_key(p: Path):
    # IDRiD_2 before IDRiD_10 when a folder does not zero-pad its numbers
    return [int(t) if t.isdigit() else t.lower() for t in re.split(r"(\d+)", p.name)]


def _images_in(folder: Path) -> list[Path]:
    return sorted(
        (
            p
            for p in folder.iterdir()
            if p.is_file()
            and p.suffix.lower() in IMAGE_EXTENSIONS
            and not p.name.startswith(".")
            and parse_mask_name(p.name) is None
            and parse_prob_name(p.name) is None
            and not p.name.startswith("overlay")
        ),
        key=_natural_key,
    )


def _masks_in(folder: Path, recursive: bool = False) -> dict[str, dict[str, Path]]:
    """stem -> {code: path} for every mask file in `folder` (and below if recursive)."""
    found: dict[str, dict[str, Path]] = {}
    it = folder.rglob("*") if recursive else folder.iterdir()
    for p in sorted(it):
        if not p.is_file() or p.name.startswith("."):
            continue
        parsed = parse_mask_name(p.name)
        if parsed:
            stem, code = parsed
            found.setdefault(stem, {}).setdefault(code, p)
    return found


def is_project_folder(folder: Path) -> bool:
    """An annotation project folder: `<stem>.retina/` holding `<stem>.<ext>`."""
    folder = Path(folder)
    if not folder.is_dir():
        return False
    if (folder / "provenance.json").is_file():
        return True
    if folder.name.endswith(PROJECT_SUFFIX):
        stem = folder.name[: -len(PROJECT_SUFFIX)]
        return any((folder / f"{stem}{ext}").is_file() for ext in IMAGE_EXTENSIONS)
    return False


def project_image(folder: Path) -> Path | None:
    """The image file inside a project folder."""
    folder = Path(folder)
    stem = folder.name[: -len(PROJECT_SUFFIX)] if folder.name.endswith(PROJECT_SUFFIX) else None
    images = _images_in(folder)
    if stem is not None:
        for p in images:
            if p.stem == stem:
                return p
    return images[0] if len(images) == 1 else (images[0] if images else None)


def _project_record(folder: Path) -> ImageRecord | None:
    image = project_image(folder)
    if image is None:
        return None
    masks = _masks_in(folder).get(image.stem, {})
    return ImageRecord(image=image, masks=masks, project=folder)


def is_idrid_folder(folder: Path) -> bool:
    return (Path(folder) / IDRID_IMAGES).is_dir()


def _idrid_records(root: Path) -> list[ImageRecord]:
    records: list[ImageRecord] = []
    img_root = root / IDRID_IMAGES
    mask_root = root / IDRID_MASKS
    splits = [s for s in IDRID_SPLITS if (img_root / s).is_dir()]
    # an unofficial split name still opens; the official ones keep their order
    splits += sorted(p.name for p in img_root.iterdir() if p.is_dir() and p.name not in splits)
    for split in splits:
        masks = _masks_in(mask_root / split, recursive=True) if (mask_root / split).is_dir() else {}
        truth = frozenset(code for m in masks.values() for code in m)  # the split's ground-truth lesions
        for image in _images_in(img_root / split):
            records.append(ImageRecord(image=image, masks=masks.get(image.stem, {}), truth=truth))
    return records


def _labels_manifest(root: Path) -> dict[str, list[str]] | None:
    """`labels.json` of a flat folder ({stem: [codes]}), or None where there is none (or it is unreadable)."""
    import json

    p = root / LABELS_MANIFEST
    if not p.is_file():
        return None
    try:
        labels = json.loads(p.read_text(encoding="utf-8")).get("labels")
    except (OSError, ValueError, AttributeError):
        return None
    if not isinstance(labels, dict):
        return None
    return {str(k): [str(c) for c in v] for k, v in labels.items() if isinstance(v, list)}


def open_dataset(folder: str | Path) -> Dataset | None:
    """The images of a folder in reading order, or None if it holds no fundus images.

    Understands the official IDRiD layout ("1. Original Images/a. Training Set", ...),
    the flat layout (`<stem>_<LESION>.tif` beside `<stem>.jpg`), an annotation project
    folder, and a folder of annotation project folders.
    """
    root = Path(folder)
    if not root.is_dir():
        return None
    if is_project_folder(root):
        rec = _project_record(root)
        return Dataset(root, "project", [rec]) if rec else None
    if is_idrid_folder(root):
        recs = _idrid_records(root)
        return Dataset(root, "idrid", recs) if recs else None
    records: list[ImageRecord] = []
    masks = _masks_in(root)
    truth = frozenset(code for m in masks.values() for code in m)  # the lesions the folder's masks cover
    manifest = _labels_manifest(root)
    seen: set[str] = set()
    for image in _images_in(root):
        if manifest is not None:  # exactly the labels it names
            named = frozenset(manifest.get(image.stem, ()))
            mine = {c: f for c, f in masks.get(image.stem, {}).items() if c in named}
            records.append(ImageRecord(image=image, masks=mine, truth=named))
        else:
            records.append(ImageRecord(image=image, masks=masks.get(image.stem, {}), truth=truth))
        seen.add(image.stem)
    # project folders whose image is not beside them (moved projects) are images too
    for sub in sorted((p for p in root.iterdir() if p.is_dir()), key=_natural_key):
        if is_project_folder(sub):
            rec = _project_record(sub)
            if rec is not None and rec.stem not in seen:
                records.append(rec)
                seen.add(rec.stem)
    if not records:
        return None
    return Dataset(root, "flat", records)
