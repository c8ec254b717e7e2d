"""The annotation project folder: everything a grader made for one fundus image.

Layout (self-contained, so it can be moved to a training machine)::

    <stem>.retina/
        <stem>.<ext>            the image, bytes unchanged
        <stem>_<LESION>.tif     binary 1-bit palette TIFF per lesion (IDRiD convention): the
                                grader's CONFIRMED pixels only (painted, or proposals accepted)
        ellipses.json           coarse ellipses (napari_retina.io.ellipses)
        provenance.json         grader, tool and model versions, times, image SHA-256
                                (the image by file name and SHA-256, each model by kind,
                                version and checksum: no file of the folder holds a path)
        overlay.png             downscaled image with the confirmed lesions blended, for review
        lesions.csv             per lesion (confirmed pixels): connected lesions, area in px and % of FOV
        proposals.json          the live model proposals (napari_retina.proposals), "format": 2:
                                id, lesion, box, threshold, who proposed it; the grader's decisions
        proposals/<id>.npz      one proposal's pixels on its box: probabilities (or mask),
                                pixels the grader erased, the grader's own pixels

Pending proposals (not accepted yet) live only in proposals.json and proposals/: they are
shown again, still pending, on reopen. A hand-only project has no proposal files.

Older forms, read by the rule they were written with and rewritten ONCE in the current form
when the folder is opened (`load`, `load_bookkeeping`): proposal tables of format 1 (or
without a number), whose mask files held the SHOWN pixels (pending ones too), and the older
`sources.json` + `sources/<LESION>.png` (one contributor per pixel). A folder that cannot be
rewritten (read-only) opens as before, with a note; its next save rewrites it whole.
Project files name no folder (`without_paths`): the folder stays valid when moved to another
machine, and a clinic's folder names (patient data) stay behind. An older folder whose
provenance.json or proposals.json holds paths loses them at its next save.
Every file is written atomically; opening a project removes temporary files a killed
save left behind.
"""

from __future__ import annotations

import csv
import getpass
import io
import json
import os
import shutil
from dataclasses import dataclass, field
from datetime import datetime, timezone
from pathlib import Path

import numpy as np

from .. import __version__
from ..lesions import LESION_CODES, LESIONS
from ..proposals import RECORD_FORMAT, PixelRecord, RecordChanges
from .atomic import atomic_path, atomic_write, atomic_write_bytes, atomic_write_text, remove_stale_temporaries
from .datasets import PROJECT_SUFFIX, project_image
from .ellipses import EllipseFile, load_ellipses, save_ellipses
from .errors import RetinaInputError
from .images import image_shape, sha256_file
from .masks import read_mask, write_mask

PROPOSALS_TABLE = "proposals.json"
PROPOSALS_DIR = "proposals"
LEGACY_SOURCES_TABLE = "sources.json"  # earlier versions: one contributor per pixel
LEGACY_SOURCES_DIR = "sources"
LEGACY_SOURCE_HAND = 1
UNREADABLE_SUFFIX = ".unreadable"  # an unreadable mask file is kept under this name when the grader replaces it
# entries earlier versions wrote with a path: the image's original location, a model's folder
PATH_KEYS = ("source_image", "folder")


def without_paths(obj):
    """A copy of a JSON-like record of a project file with no path in it: the `PATH_KEYS` entries
    left out, any other absolute path (or one under ~) by its file name."""
    from pathlib import PurePosixPath, PureWindowsPath

    if isinstance(obj, dict):
        return {k: without_paths(v) for k, v in obj.items() if k not in PATH_KEYS}
    if isinstance(obj, list):
        return [without_paths(v) for v in obj]
    if isinstance(obj, str) and (obj.startswith("~") or PurePosixPath(obj).is_absolute()
                                 or PureWindowsPath(obj).is_absolute()):
        return PureWindowsPath(obj).name if PureWindowsPath(obj).is_absolute() else PurePosixPath(obj).name
    return obj


def now_iso() -> str:
    return datetime.now(timezone.utc).isoformat(timespec="seconds")


def default_project_dir(image: str | Path, root: str | Path | None = None) -> Path:
    """`<stem>.retina/` beside the image, or inside `root` when the grader chose one."""
    image = Path(image)
    parent = Path(root) if root is not None else image.parent
    return parent / f"{image.stem}{PROJECT_SUFFIX}"


@dataclass
class Annotation:
    """The grader's work on one image, in memory.

    `record` says who set each mask pixel (napari_retina.proposals); all pixel edits,
    the grader's and the models', go through it, so it also knows what to save next.

    `masks` are the pixels SHOWN (what the viewer draws: confirmed and pending); the
    CONFIRMED ones (painted or accepted) are `confirmed(code)` = `record.hand(code)`, and
    only those are saved as mask files, overlay.png and lesions.csv. Pending = `pending(code)`.
    """

    image_name: str
    shape: tuple[int, int]
    masks: dict[str, np.ndarray]  # lesion code -> bool (H, W) SHOWN (confirmed | pending), every lesion present
    ellipses: EllipseFile
    provenance: dict = field(default_factory=dict)
    # lesion code -> why its mask file could not be read: left out, and its file is not
    # overwritten until the grader edits that lesion
    unreadable: dict[str, str] = field(default_factory=dict)
    notes: list[str] = field(default_factory=list)  # what opening left out, one line each
    record: PixelRecord = field(init=False, repr=False)
    # the folder on disk is of an older form (proposal table format 1, sources.json) and could
    # not be rewritten on opening: the next save rewrites it whole, proposals before masks
    legacy_sources: bool = field(default=False, repr=False)

    def __post_init__(self) -> None:
        self.record = PixelRecord(self.masks)

    def confirmed(self, code: str) -> np.ndarray:
        """The grader's confirmed pixels of a lesion (painted or accepted): what its mask file holds. A copy."""
        return self.record.hand(code).copy()

    def pending(self, code: str) -> np.ndarray:
        """Pixels shown for a lesion that are model proposals not accepted yet (never saved as a mask)."""
        return self.masks[code] & ~self.record.hand(code)

    def confirmed_masks(self) -> dict[str, np.ndarray]:
        """`confirmed` of every lesion (copies): e.g. what a `ProjectWriter` starts from."""
        return {c: self.confirmed(c) for c in self.masks}

    @property
    def reviewed(self) -> set[str]:
        """Lesions the grader marked as reviewed: their masks are labels for training (provenance.json)."""
        rev = self.provenance.get("reviewed", {})
        return set(rev) if isinstance(rev, dict) else set()

    def set_reviewed(self, code: str, on: bool = True, grader: str | None = None) -> None:
        """Mark (or unmark) one lesion of this image as reviewed; saved with the provenance."""
        if code not in self.masks:
            raise ValueError(f"unknown lesion {code!r}")
        rev = dict(self.provenance.get("reviewed", {})) if isinstance(self.provenance.get("reviewed"), dict) else {}
        if on:
            rev[code] = {"by": grader or _user(), "when": now_iso()}
        else:
            rev.pop(code, None)
        self.provenance["reviewed"] = rev

    @classmethod
    def empty(cls, image_name: str, shape: tuple[int, int]) -> "Annotation":
        return cls(
            image_name=image_name,
            shape=tuple(shape),
            masks={c: np.zeros(shape, bool) for c in LESION_CODES},
            ellipses=EllipseFile(image=image_name, ellipses=[], extra={}),
        )

    def snapshot(self, ellipses: EllipseFile | None = None, all_lesions: bool = False) -> "ProjectSnapshot":
        """What the next save writes, copied now: only masks and proposals that changed.

        The masks are the CONFIRMED pixels (`confirmed`). `ellipses`: the ellipses if they
        changed (None: not written). `all_lesions`: a new project gets every mask file. A
        lesion whose file was unreadable is written only once the grader has edited it. A
        folder still of an older form (`legacy_sources`) gets everything, once.
        """
        changes = self.record.take_changes()
        edited = set(changes.lesions)
        replaced = {c for c in edited if self.unreadable.pop(c, None) is not None}
        codes = set(LESION_CODES) if all_lesions or (self.legacy_sources and changes) else edited
        codes -= set(self.unreadable)
        rec = self.record
        table = None
        arrays: dict[int, dict] = {}
        removed = set(changes.removed)
        legacy = False
        if changes.table or changes.proposals or changes.removed or (self.legacy_sources and changes):
            table = rec.table()
            ids = set(rec.proposals) if self.legacy_sources else changes.proposals
            arrays = {i: rec.arrays(i) for i in ids if i in rec.proposals}
            legacy, self.legacy_sources = self.legacy_sources, False
        return ProjectSnapshot(
            image_name=self.image_name,
            masks={c: self.confirmed(c) for c in LESION_CODES if c in codes},
            ellipses=ellipses,
            provenance=json.loads(json.dumps(self.provenance)),
            proposal_table=table,
            proposal_arrays=arrays,
            removed_proposals=removed,
            drop_legacy_sources=legacy,
            replaces_unreadable=replaced,
            changes=changes,
        )


@dataclass
class ProjectSnapshot:
    """One save's content, taken on the GUI thread in a few milliseconds, written in the background."""

    image_name: str
    masks: dict[str, np.ndarray]  # copies of the CONFIRMED pixels of the lesions to write
    ellipses: EllipseFile | None  # None: unchanged
    provenance: dict
    proposal_table: dict | None  # None: unchanged
    proposal_arrays: dict[int, dict]  # proposal id -> its arrays, for the files to (re)write
    removed_proposals: set[int]
    drop_legacy_sources: bool = False  # this save turns an older-form folder into the current form
    replaces_unreadable: set[str] = field(default_factory=set)
    changes: RecordChanges = field(default_factory=RecordChanges)  # handed back if the save fails

    def has_content(self) -> bool:
        return bool(self.masks) or self.ellipses is not None or self.proposal_table is not None


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

    def proposal_path(self, proposal_id: int) -> Path:
        return self.path / PROPOSALS_DIR / f"{int(proposal_id)}.npz"

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
            }
            atomic_write_text(path / "provenance.json", json.dumps(prov, indent=2) + "\n")
        return project

    # --- reading ---------------------------------------------------------------------
    def remove_leftovers(self) -> list[Path]:
        """Temporary files a killed save left behind (only names of the atomic-write pattern)."""
        return remove_stale_temporaries(self.path) + remove_stale_temporaries(self.path / PROPOSALS_DIR)

    def load(self, migrate: bool = True) -> Annotation:
        """The project's annotation. An unreadable mask is left out (noted in `unreadable`, `notes`).

        A folder of an older form is read by its own rule and (`migrate`) rewritten once in
        the current form (`load_record`).
        """
        image = self.image_path
        if image is None:
            raise RetinaInputError(f"{self.path}: not an annotation project (no image inside)")
        self.remove_leftovers()
        shape = image_shape(image)
        ann = Annotation.empty(image.name, shape)
        # the mask files before the proposal table: a migration elsewhere writes the table first
        # and the masks after, so whichever of its steps this sees, the rules below read it right
        for code in LESION_CODES:
            p = self.mask_path(code)
            if p.exists():
                try:
                    ann.masks[code] = read_mask(p, expected_shape=shape)
                except RetinaInputError as e:
                    leave_out(ann, code, str(e))
        self.load_bookkeeping(ann, migrate=migrate, masks_from_files=True)
        return ann

    def load_bookkeeping(self, ann: Annotation, migrate: bool = True, masks_from_files: bool = False) -> None:
        """Ellipses, provenance and who set which pixels, into `ann` whose masks are loaded (e.g. from layers).

        `ann.masks` may hold the confirmed pixels (the mask files, or `lesions.confirmed_pixels`
        of the layers) or the shown ones (a layer's non-zero pixels): both read the same, and
        `ann.masks` holds the shown pixels afterwards. `masks_from_files`: they were read from
        this folder's mask files just now (`load`).
        """
        ell = self.path / "ellipses.json"
        if ell.exists():
            ann.ellipses = load_ellipses(ell)
        prov = self.path / "provenance.json"
        if prov.exists():
            ann.provenance = without_paths(_read_json(prov))
        self.load_record(ann, migrate=migrate, masks_from_files=masks_from_files)

    def load_record(self, ann: Annotation, migrate: bool = True, masks_from_files: bool = False) -> None:
        """Restore who set which pixels into `ann`, whose masks are loaded; a broken record is noted, not fatal.

        A record of an older form (proposal table of format 1 or without a number, or
        sources.json) is read by today's rule of that form and, with `migrate`, rewritten
        ONCE in the current form right here. On opening, not on the first save: the whole
        folder has just been read by one rule, so it can be written back in an order in which
        every intermediate state still reads the same (`_migrate`); a first save would mix the
        rewrite with the grader's edits, and a folder only read (training, evaluate) would
        stay in the old form for good. If it cannot be written (a read-only folder) the
        annotation opens as read, with one note, and its next save rewrites it whole. A folder
        of the current form is never written here (a reader may run beside the grader's autosave).
        """
        old_form = False
        try:
            if (self.path / PROPOSALS_TABLE).exists():
                old_form = self._load_proposals(ann, masks_from_files)
            elif (self.path / LEGACY_SOURCES_TABLE).exists():
                self._load_legacy_sources(ann, masks_from_files)
                old_form = True
        except RetinaInputError as e:
            # the masks are the truth: without the record every pixel counts as the grader's
            ann.notes.append(f"{e}; model proposals of this image now count as your own pixels")
            return
        if old_form:
            ann.legacy_sources = True
            if migrate:
                self._migrate(ann)

    def _load_proposals(self, ann: Annotation, masks_from_files: bool) -> bool:
        """proposals.json and proposals/; True when it is of an older form (to be rewritten)."""
        table = _read_json(self.path / PROPOSALS_TABLE)
        entries = table.get("proposals")
        if not isinstance(entries, list):
            raise RetinaInputError(f"{self.path / PROPOSALS_TABLE}: malformed proposal table")
        try:
            form = int(table.get("format", 1) or 1)
        except (TypeError, ValueError):
            raise RetinaInputError(f"{self.path / PROPOSALS_TABLE}: malformed proposal table") from None
        if form > RECORD_FORMAT:
            raise RetinaInputError(
                f"{self.path / PROPOSALS_TABLE}: written by a newer napari-retina (format {form}); update to read it")
        old_form = form < RECORD_FORMAT
        arrays = {}
        for entry in entries:
            try:
                pid = int(entry["id"])
                with np.load(self.proposal_path(pid), allow_pickle=False) as z:
                    arrays[pid] = {k: z[k] for k in z.files}
            except (KeyError, TypeError, ValueError, OSError) as e:
                kept = "its pixels count as your own" if old_form else "its pending pixels are left out"
                ann.notes.append(f"{self.path.name}: proposal {entry!r:.60} unreadable ({e}); {kept}")
        if old_form and not masks_from_files:
            self._shown_from_files(ann, {str(e.get("lesion")) for e in entries if isinstance(e, dict)})
        stale = ann.record.restore(dict(table, format=form), arrays)
        if not old_form and ((stale and masks_from_files) or (self.path / LEGACY_SOURCES_TABLE).exists()):
            # a killed rewrite left mask files with pending pixels in them (they read right) or
            # sources.json behind: the next save rewrites it whole. Not here: a reader of a
            # current-form folder (training while the grader annotates) must never write into it
            ann.legacy_sources = True
        return old_form

    def _shown_from_files(self, ann: Annotation, lesions: set[str]) -> None:
        """An older form's mask files hold the shown pixels, its rule needs them: masks given as
        confirmed pixels (e.g. from layers) would make every pending pixel read as erased."""
        for code in lesions:
            path = self.mask_path(code)
            if code in ann.masks and code not in ann.unreadable and path.exists():
                try:
                    ann.masks[code] |= read_mask(path, expected_shape=ann.shape)
                except RetinaInputError:
                    pass  # the masks given stay the truth

    def _migrate(self, ann: Annotation) -> None:
        """Rewrite an older-form folder once in the current form; on failure, note it and go on.

        Order, so that a crash at any point loses nothing: (1) every proposal's arrays (the
        older table reads them the same), (2) the table with the format number (from here the
        current rule reads the folder, and it reads mask files that still hold shown pixels
        right), (3) the mask files with confirmed pixels only, (4) sources.json goes, (5) the
        summary files follow the confirmed pixels.
        """
        rec = ann.record
        try:
            if rec.proposals:
                (self.path / PROPOSALS_DIR).mkdir(exist_ok=True)
            for pid in sorted(rec.proposals):
                atomic_write(self.proposal_path(pid), lambda tmp, a=rec.arrays(pid): _save_npz(tmp, a))
            atomic_write_text(self.path / PROPOSALS_TABLE, json.dumps(without_paths(rec.table()), indent=1) + "\n")
            rewritten = []
            for code in LESION_CODES:
                # the older form's file holds the shown pixels: rewrite it where some are pending
                if code not in ann.unreadable and ann.pending(code).any():
                    write_mask(self.mask_path(code), rec.hand(code))
                    rewritten.append(code)
            if (self.path / LEGACY_SOURCES_TABLE).exists():
                _remove_quietly(self.path / LEGACY_SOURCES_TABLE)
                shutil.rmtree(self.path / LEGACY_SOURCES_DIR, ignore_errors=True)
            if rewritten:
                self._migrate_summary(ann)
        except (RetinaInputError, OSError) as e:
            reason = str(e) if isinstance(e, RetinaInputError) else (e.strerror or str(e))
            ann.notes.append(f"{self.path.name}: kept in its older form ({reason}); it opens as before "
                             "and is rewritten when it is next saved")
            return
        ann.legacy_sources = False

    def _migrate_summary(self, ann: Annotation) -> None:
        """lesions.csv and overlay.png of the confirmed pixels (only the ones the folder had)."""
        confirmed = ann.confirmed_masks()
        if (self.path / "lesions.csv").exists():
            self._save_lesion_table(confirmed, None, ann.provenance, None)
        if (self.path / "overlay.png").exists() and self.image_path is not None:
            from .images import read_fundus

            try:
                rgb = read_fundus(self.image_path)
            except RetinaInputError:
                return  # the overlay is a view for people; the masks are what counts
            if rgb.shape[:2] == tuple(ann.shape):
                self._save_overlay(confirmed, rgb)

    def _load_legacy_sources(self, ann: Annotation, masks_from_files: bool = True) -> None:
        """`sources.json` + `sources/<LESION>.png` (one contributor per pixel) -> mask proposals."""
        table_path = self.path / LEGACY_SOURCES_TABLE
        raw = _read_json(table_path)
        try:
            described = {int(k): v for k, v in raw.get("sources", {}).items()}
        except (ValueError, AttributeError):
            raise RetinaInputError(f"{table_path}: malformed source table") from None
        import cv2  # lazily: only projects with model contributions need it

        if not masks_from_files:
            self._shown_from_files(ann, {str(c) for c in raw.get("lesions", [])})
        entries, arrays = [], {}
        for code in raw.get("lesions", []):
            p = self.path / LEGACY_SOURCES_DIR / f"{code}.png"
            if code not in ann.masks or code in ann.unreadable or not p.exists():
                continue
            src = cv2.imread(str(p), cv2.IMREAD_UNCHANGED)
            if src is None or src.shape != tuple(ann.shape):
                raise RetinaInputError(f"{p}: unreadable or of the wrong size")
            src = np.where(ann.masks[code], src, 0)  # the mask file is the truth
            for sid in np.unique(src):
                if sid <= LEGACY_SOURCE_HAND:
                    continue
                rows, cols = np.nonzero(src == sid)
                box = [int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1]
                arrays[int(sid)] = {"mask": src[box[0] : box[1], box[2] : box[3]] == sid}
                desc = dict(described.get(int(sid), {"kind": "model"}))
                desc.pop("lesion", None)
                entries.append({"id": int(sid), "lesion": code, "box": box, "description": desc})
        ann.record.restore({"format": 1, "proposals": entries}, arrays)

    # --- writing ---------------------------------------------------------------------
    def save(
        self,
        ann: Annotation,
        rgb: np.ndarray | None = None,
        fov_area_px: int | None = None,
        lesions: set[str] | None = None,
        grader: str | None = None,
    ) -> None:
        """Write the whole annotation (headless use); `lesions` limits the mask files to those.

        Each file is replaced atomically, so a crash leaves the previous version of any
        file that was being written.
        """
        snap = ann.snapshot(ellipses=ann.ellipses, all_lesions=True)
        if lesions is not None:
            snap.masks = {c: m for c, m in snap.masks.items() if c in lesions}
        snap.proposal_table = ann.record.table()
        snap.proposal_arrays = {i: ann.record.arrays(i) for i in ann.record.proposals}
        snap.drop_legacy_sources, ann.legacy_sources = snap.drop_legacy_sources or ann.legacy_sources, False
        self.write(snap, grader=grader, fov_area_px=fov_area_px)
        self.write_summary(ann.confirmed_masks(), rgb=rgb, fov_area_px=fov_area_px, provenance=ann.provenance)

    def write(self, snap: ProjectSnapshot, grader: str | None = None, fov_area_px: int | None = None) -> None:
        """Write what a snapshot holds: its masks (confirmed pixels), ellipses, proposals and the provenance.

        The mask files go before the proposal record: an accepted proposal leaves the record
        only once its pixels are in the mask file. A save that turns an older-form folder into
        the current one (`drop_legacy_sources`) goes the other way round, as `_migrate` does:
        the older mask files hold pending pixels, which must be in the record before they
        leave the files.
        """
        if not self.path.is_dir():
            raise RetinaInputError(f"{self.path}: the project folder is gone")
        if snap.drop_legacy_sources:
            self._write_proposals(snap)
        for code, mask in snap.masks.items():
            target = self.mask_path(code)
            if code in snap.replaces_unreadable and target.exists():
                # the grader now edits a lesion whose file could not be read: keep those bytes
                os.replace(target, target.with_name(target.name + UNREADABLE_SUFFIX))
            write_mask(target, mask)
        if snap.ellipses is not None:
            save_ellipses(self.path / "ellipses.json", snap.ellipses)
        if not snap.drop_legacy_sources:
            self._write_proposals(snap)
        else:
            _remove_quietly(self.path / LEGACY_SOURCES_TABLE)
            shutil.rmtree(self.path / LEGACY_SOURCES_DIR, ignore_errors=True)
        self._save_provenance(snap.provenance, snap.image_name, grader, fov_area_px)

    def _write_proposals(self, snap: ProjectSnapshot) -> None:
        if snap.proposal_table is None:
            return
        if snap.proposal_arrays:
            (self.path / PROPOSALS_DIR).mkdir(exist_ok=True)
        for pid, arrays in snap.proposal_arrays.items():
            atomic_write(self.proposal_path(pid), lambda tmp, a=arrays: _save_npz(tmp, a))
        # the table last: every proposal it names is on disk by then
        atomic_write_text(self.path / PROPOSALS_TABLE, json.dumps(without_paths(snap.proposal_table), indent=1) + "\n")
        for pid in snap.removed_proposals:
            _remove_quietly(self.proposal_path(pid))

    def write_summary(
        self,
        masks: dict[str, np.ndarray],
        rgb: np.ndarray | None = None,
        fov_area_px: int | None = None,
        provenance: dict | None = None,
        counts: dict[str, int] | None = None,
    ) -> None:
        """lesions.csv and (given the image) overlay.png, from all five masks: the CONFIRMED pixels
        (`Annotation.confirmed_masks`), never pending proposals."""
        self._save_lesion_table(masks, fov_area_px, provenance or {}, counts)
        if rgb is not None:
            self._save_overlay(masks, rgb)

    def _save_lesion_table(self, masks, fov_area_px, provenance, counts) -> None:
        from ..fundus import count_lesions

        h, w = next(iter(masks.values())).shape
        total = fov_area_px or provenance.get("fov_area_px") or h * w
        out = io.StringIO()
        wr = csv.writer(out, lineterminator="\n")
        wr.writerow(["lesion", "name", "count", "area_px", "area_pct_fov"])
        for les in LESIONS:
            m = masks[les.code]
            area = int(m.sum())
            n = counts[les.code] if counts and les.code in counts else (count_lesions(m) if area else 0)
            wr.writerow([les.code, les.name, n, area, f"{100.0 * area / total:.4f}"])
        atomic_write_text(self.path / "lesions.csv", out.getvalue())

    def _save_overlay(self, masks, rgb: np.ndarray) -> None:
        import cv2

        from ..fundus import overlay_rgb

        ov = overlay_rgb(rgb, masks)
        ok, buf = cv2.imencode(".png", cv2.cvtColor(ov, cv2.COLOR_RGB2BGR))
        if ok:
            atomic_write_bytes(self.path / "overlay.png", buf.tobytes())

    def _save_provenance(self, provenance: dict, image_name: str, grader: str | None, fov_area_px: int | None) -> dict:
        p = self.path / "provenance.json"
        prov = _read_json(p) if p.exists() else {}
        prov.update({k: v for k, v in provenance.items() if k not in ("created",)})
        prov.setdefault("image", image_name)
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
        prov = without_paths(prov)  # an older folder's paths go at its next save
        atomic_write_text(p, json.dumps(prov, indent=2) + "\n")
        return prov


class ProjectWriter:
    """Writes one image's successive snapshots into its project folder, from one background thread.

    It keeps its own copy of the five CONFIRMED masks as last written (updated from each
    snapshot's changed lesions), so the lesion counts, lesions.csv and overlay.png never need
    the GUI thread's masks and never count pending proposals. Give it the `Annotation` (or
    `Annotation.confirmed_masks()`), not `Annotation.masks`, which holds pending pixels too.
    """

    def __init__(
        self,
        project_dir: str | Path,
        image: str | Path,
        rgb: np.ndarray,
        masks: "Annotation | dict[str, np.ndarray]",
        grader: str | None = None,
    ):
        self.project = ProjectFolder(project_dir)
        self.image = Path(image)
        self.rgb = rgb
        if isinstance(masks, Annotation):
            masks = masks.confirmed_masks()
        self.masks = {c: m.copy() for c, m in masks.items()}  # the writer's own: the GUI edits the originals
        self.grader = grader
        self.fov: np.ndarray | None = None
        self._rows: dict[str, dict] = {}
        self._stale: set[str] = set(self.masks)  # lesions whose counts are not computed yet

    def write(
        self, snap: ProjectSnapshot, summary: bool = False, grader: str | None = None, counts: bool = True
    ) -> list[dict] | None:
        """Write the snapshot (creating the folder first if needed); returns the lesion rows.

        `counts=False` leaves recounting changed lesions for later (returns None): the
        annotator asks for it while a model runs, which then has the CPU.
        """
        if grader:
            self.grader = grader
        if not self.project.exists():
            self.project = ProjectFolder.create(self.project.path, self.image, grader=self.grader)
        fov_area = int(self.fov.sum()) if self.fov is not None else None
        self.project.write(snap, grader=self.grader, fov_area_px=fov_area)
        for code, m in snap.masks.items():
            self.masks[code] = m
            self._stale.add(code)
        rows = self.counts() if counts or summary else None
        if summary:
            self.project.write_summary(
                self.masks,
                rgb=self.rgb,
                fov_area_px=fov_area,
                provenance=snap.provenance,
                counts={r["lesion"]: r["count"] for r in rows},
            )
        return rows

    def counts(self) -> list[dict]:
        """Lesion rows (count, area, % of FOV) of the masks as last written; only changed ones are recounted."""
        from ..fundus import lesion_summary

        if self._stale:
            rows = lesion_summary({c: self.masks[c] for c in self._stale}, self.fov)
            self._rows.update({r["lesion"]: r for r in rows if r["lesion"] in self._stale})
            self._stale.clear()
        return [self._rows[les.code] for les in LESIONS]

    def set_fov(self, fov: np.ndarray | None) -> None:
        """The field of view is known: areas become % of it."""
        self.fov = fov
        self._stale = set(self.masks)


def leave_out(ann: Annotation, code: str, reason: str) -> None:
    """An unreadable mask: the lesion starts empty and its file is not overwritten until edited."""
    ann.masks[code] = np.zeros(ann.shape, bool)
    ann.unreadable[code] = reason
    ann.notes.append(f"{reason}; {code} left out (the file is kept until you edit {code})")


def _save_npz(tmp: Path, arrays: dict[str, np.ndarray]) -> None:
    with open(tmp, "wb") as f:  # a file object: numpy would append ".npz" to a name
        np.savez_compressed(f, **arrays)


def _remove_quietly(path: Path) -> None:
    try:
        path.unlink()
    except OSError:
        pass


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
