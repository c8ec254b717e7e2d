"""The annotation project folder: everything a grader made for one fundus image.

Layout (self-contained, so it can be moved to a training machine)::

    <stem>.retina/
        <stem>.<ext>            the image, bytes unchanged
        <stem>_<LESION>.tif     binary 1-bit palette TIFF per lesion (IDRiD convention)
        ellipses.json           coarse ellipses (napari_retina.io.ellipses)
        provenance.json         grader, tool and model versions, times, image SHA-256
        overlay.png             downscaled image with the lesions blended, for review
        lesions.csv             per lesion: connected lesions, area in px and % of FOV
        sources.json            who contributed pixels: 1 = the grader's hand, 2.. = models
        sources/<LESION>.png    uint16 map of the contributor of each lesion pixel

A lesion without `sources/<LESION>.png` was painted entirely by hand, so a
hand-only project costs nothing extra. Every file is written atomically.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..lesions import LESION_CODES, LESIONS
from .atomic import atomic_path, atomic_write_bytes, atomic_write_text
from .datasets import PROJECT_SUFFIX, project_image
from .ellipses import EllipseFile, load_ellipses, save_ellipses
from .errors import RetinaInputError
from .images import image_shape, sha256_file
from .masks import read_mask, write_mask

SOURCE_NONE = 0
SOURCE_HAND = 1


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_project_dir(image: str | Path, root: str | Path | None = None) -> Path:
    """`<stem>.retina/` beside the image, or inside `root` when the grader chose one."""
    image = Path(image)
    parent = Path(root) if root is not None else image.parent
    return parent / f"{image.stem}{PROJECT_SUFFIX}"


@dataclass
class Annotation:
    """The grader's work on one image, in memory."""

    image_name: str
    shape: tuple[int, int]
    masks: dict[str, np.ndarray]  # lesion code -> bool (H, W), every lesion present
    ellipses: EllipseFile
    provenance: dict = field(default_factory=dict)
    # lesion code -> uint16 (H, W) contributor id per pixel; absent = all hand-painted
    sources: dict[str, np.ndarray] = field(default_factory=dict)
    # contributor id -> description ({"kind": "hand"} or {"kind": "model", ...})
    source_table: dict[int, dict] = field(default_factory=lambda: {SOURCE_HAND: {"kind": "hand"}})

    @classmethod
    def empty(cls, image_name: str, shape: tuple[int, int]) -> "Annotation":
        return cls(
            image_name=image_name,
            shape=tuple(shape),
            masks={c: np.zeros(shape, bool) for c in LESION_CODES},
            ellipses=EllipseFile(image=image_name, ellipses=[], extra={}),
        )

    def add_source(self, description: dict) -> int:
        """Register a model contribution (e.g. one refined ellipse); returns its id."""
        new_id = max(self.source_table, default=SOURCE_HAND) + 1
        if new_id > np.iinfo(np.uint16).max:
            raise RetinaInputError("too many model contributions in one image (65535)")
        self.source_table[new_id] = dict(description)
        return new_id

    def source_map(self, code: str) -> np.ndarray:
        """The contributor map of a lesion, created (all hand) on first use."""
        if code not in self.sources:
            m = np.zeros(self.shape, np.uint16)
            m[self.masks[code]] = SOURCE_HAND
            self.sources[code] = m
        return self.sources[code]

    def add_model_pixels(self, code: str, pixels: np.ndarray, source_id: int) -> None:
        """Add model-proposed pixels; pixels the grader painted stay the grader's."""
        src = self.source_map(code)
        new = pixels & (src != SOURCE_HAND)
        src[new] = source_id
        self.masks[code] |= pixels

    def remove_source(self, code: str, source_id: int) -> int:
        """Remove what one contributor added to a lesion; hand-painted pixels stay. Returns pixels removed."""
        if code not in self.sources:
            return 0
        src = self.sources[code]
        gone = src == source_id
        n = int(gone.sum())
        src[gone] = SOURCE_NONE
        self.masks[code][gone] = False
        return n

    def mark_hand(self, code: str, painted: np.ndarray, erased: np.ndarray | None = None) -> None:
        """Record a brush stroke: painted pixels become the grader's, erased ones nobody's."""
        if code not in self.sources:
            return  # hand-only lesion: nothing to track
        src = self.sources[code]
        src[painted] = SOURCE_HAND
        if erased is not None:
            src[erased] = SOURCE_NONE


class ProjectFolder:
    """One annotation project folder on disk (see the module docstring for its layout)."""

    def __init__(self, path: str | Path):
        self.path = Path(path)

    def __repr__(self) -> str:
        return f"ProjectFolder({str(self.path)!r})"

    # --- locations -------------------------------------------------------------------
    @property
    def image_path(self) -> Path | None:
        return project_image(self.path) if self.path.is_dir() else None

    @property
    def stem(self) -> str:
        img = self.image_path
        if img is not None:
            return img.stem
        name = self.path.name
        return name[: -len(PROJECT_SUFFIX)] if name.endswith(PROJECT_SUFFIX) else name

    def mask_path(self, code: str) -> Path:
        return self.path / f"{self.stem}_{code}.tif"

    def exists(self) -> bool:
        return self.image_path is not None

    # --- creation --------------------------------------------------------------------
    @classmethod
    def create(cls, path: str | Path, image: str | Path, grader: str | None = None) -> "ProjectFolder":
        """Make the folder and copy the image into it unchanged. Clear error if it can't."""
        path, image = Path(path), Path(image)
        try:
            path.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise RetinaInputError(f"cannot create the project folder {path}: {e.strerror or e}") from None
        target = path / image.name
        if not target.exists():
            try:
                with atomic_path(target) as tmp:
                    shutil.copyfile(image, tmp)
            except RetinaInputError:
                raise
            except OSError as e:
                raise RetinaInputError(f"cannot copy {image.name} into {path}: {e.strerror or e}") from None
        project = cls(path)
        if not (path / "provenance.json").exists():
            prov = {
                "image": image.name,
                "image_sha256": sha256_file(target),
                "grader": grader or _user(),
                "tool": "napari-retina",
                "tool_version": __version__,
                "models": {},
                "created": now_iso(),
                "modified": now_iso(),
                "source_image": str(image.resolve()),
            }
            atomic_write_text(path / "provenance.json", json.dumps(prov, indent=2) + "\n")
        return project

    # --- reading ---------------------------------------------------------------------
    def load(self) -> Annotation:
        image = self.image_path
        if image is None:
            raise RetinaInputError(f"{self.path}: not an annotation project (no image inside)")
        shape = image_shape(image)
        ann = Annotation.empty(image.name, shape)
        for code in LESION_CODES:
            p = self.mask_path(code)
            if p.exists():
                ann.masks[code] = read_mask(p, expected_shape=shape)
        ell = self.path / "ellipses.json"
        if ell.exists():
            ann.ellipses = load_ellipses(ell)
        prov = self.path / "provenance.json"
        if prov.exists():
            ann.provenance = _read_json(prov)
        self._load_sources(ann)
        return ann

    def _load_sources(self, ann: Annotation) -> None:
        table = self.path / "sources.json"
        if not table.exists():
            return
        raw = _read_json(table)
        try:
            ann.source_table = {int(k): v for k, v in raw.get("sources", {}).items()}
        except (ValueError, AttributeError):
            raise RetinaInputError(f"{table}: malformed source table") from None
        ann.source_table.setdefault(SOURCE_HAND, {"kind": "hand"})
        import cv2  # lazily: only projects with model contributions need it

        for code in raw.get("lesions", []):
            p = self.path / "sources" / f"{code}.png"
            if code not in ann.masks or not p.exists():
                continue
            m = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if m is None or m.shape != tuple(ann.shape):
                raise RetinaInputError(f"{p}: unreadable or of the wrong size")
            src = m.astype(np.uint16)
            # the mask file is the truth: a pixel outside it has no contributor
            src[~ann.masks[code]] = SOURCE_NONE
            # a lesion pixel with no contributor was painted by hand (e.g. edited outside napari)
            src[ann.masks[code] & (src == SOURCE_NONE)] = SOURCE_HAND
            ann.sources[code] = src

    # --- writing ---------------------------------------------------------------------
    def save(
        self,
        ann: Annotation,
        rgb: np.ndarray | None = None,
        fov_area_px: int | None = None,
        lesions: set[str] | None = None,
        grader: str | None = None,
    ) -> None:
        """Write the annotation; `lesions` limits the mask files rewritten to those changed.

        Each file is replaced atomically, so a crash leaves the previous version of
        any file that was being written.
        """
        if not self.path.is_dir():
            raise RetinaInputError(f"{self.path}: the project folder is gone")
        codes = LESION_CODES if lesions is None else [c for c in LESION_CODES if c in lesions]
        for code in codes:
            write_mask(self.mask_path(code), ann.masks[code])
        save_ellipses(self.path / "ellipses.json", ann.ellipses)
        self._save_sources(ann, codes)
        self._save_lesion_table(ann, fov_area_px)
        if rgb is not None:
            self._save_overlay(ann, rgb)
        self._save_provenance(ann, grader, fov_area_px)

    def _save_sources(self, ann: Annotation, codes) -> None:
        if not ann.sources:
            return
        import cv2

        (self.path / "sources").mkdir(exist_ok=True)
        for code in codes:
            if code in ann.sources:
                ok, buf = cv2.imencode(".png", ann.sources[code])
                if not ok:
                    raise RetinaInputError(f"cannot encode the source map of {code}")
                atomic_write_bytes(self.path / "sources" / f"{code}.png", buf.tobytes())
        table = {
            "lesions": sorted(ann.sources),
            "sources": {str(k): v for k, v in sorted(ann.source_table.items())},
        }
        atomic_write_text(self.path / "sources.json", json.dumps(table, indent=2) + "\n")

    def _save_lesion_table(self, ann: Annotation, fov_area_px: int | None) -> None:
        from ..fundus import count_lesions

        total = fov_area_px or ann.provenance.get("fov_area_px") or ann.shape[0] * ann.shape[1]
        out = io.StringIO()
        w = csv.writer(out, lineterminator="\n")
        w.writerow(["lesion", "name", "count", "area_px", "area_pct_fov"])
        for les in LESIONS:
            m = ann.masks[les.code]
            area = int(m.sum())
            w.writerow([les.code, les.name, count_lesions(m) if area else 0, area, f"{100.0 * area / total:.4f}"])
        atomic_write_text(self.path / "lesions.csv", out.getvalue())

    def _save_overlay(self, ann: Annotation, rgb: np.ndarray) -> None:
        import cv2

        from ..fundus import overlay_rgb

        ov = overlay_rgb(rgb, ann.masks)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(self.path / "overlay.png", buf.tobytes())

    def _save_provenance(self, ann: Annotation, grader: str | None, fov_area_px: int | None) -> None:
        p = self.path / "provenance.json"
        prov = _read_json(p) if p.exists() else {}
        prov.update({k: v for k, v in ann.provenance.items() if k not in ("created",)})
        prov.setdefault("image", ann.image_name)
        prov.setdefault("created", now_iso())
        prov.setdefault("grader", grader or _user())
        if grader:
            graders = prov.setdefault("graders", [])
            if grader not in graders:
                graders.append(grader)
            prov["grader"] = grader
        if "image_sha256" not in prov and self.image_path is not None:
            prov["image_sha256"] = sha256_file(self.image_path)
        if fov_area_px:
            prov["fov_area_px"] = int(fov_area_px)
        prov["tool"] = "napari-retina"
        prov["tool_version"] = __version__
        prov.setdefault("models", {})
        prov["modified"] = now_iso()
        ann.provenance = prov
        atomic_write_text(p, json.dumps(prov, indent=2) + "\n")


def _user() -> str:
    try:
        return getpass.getuser()
    except Exception:  # no login name in some containers
        return "unknown"


def _read_json(path: Path) -> dict:
    try:
        obj = json.loads(Path(path).read_text(encoding="utf-8"))
    except (OSError, UnicodeDecodeError, json.JSONDecodeError) as e:
        raise RetinaInputError(f"{path}: unreadable ({e})") from None
    if not isinstance(obj, dict):
        raise RetinaInputError(f"{path}: expected a JSON object")
    return obj
