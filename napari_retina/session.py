"""One fundus image under annotation, as napari layer data, without importing napari.

The reader, the annotator dock and the CLI all open images through
`open_record`, and turn layers back into an `Annotation` through the
converters here, so the three agree on layer names, colours and metadata.
"""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path

import numpy as np

from .io.datasets import Dataset, ImageRecord
from .io.ellipses import Ellipse, EllipseFile, corners_to_ellipse, ellipse_to_corners
from .io.images import read_fundus
from .io.masks import read_mask
from .io.errors import RetinaInputError
from .io.project import Annotation, ProjectFolder, default_project_dir, leave_out
from .lesions import LESION_CODES, LESIONS, lesion

META_KEY = "napari_retina"
ELLIPSES_LAYER = "ellipses"


@dataclass
class OpenedImage:
    """What opening one image gives: pixels, the annotation and where it is saved."""

    record: ImageRecord
    rgb: np.ndarray
    annotation: Annotation
    project_dir: Path
    from_project: bool  # True when restored from an existing project folder
    dataset_root: Path | None = None
    # does it look like a fundus photograph (round field of view)? None until the FOV is computed
    fundus: bool | None = None

    @property
    def stem(self) -> str:
        return self.record.stem


def project_dir_for(record: ImageRecord, project_root: str | Path | None = None) -> Path:
    if record.project is not None:
        return record.project
    return default_project_dir(record.image, project_root)


def open_record(
    record: ImageRecord,
    project_root: str | Path | None = None,
    dataset: Dataset | None = None,
) -> OpenedImage:
    """Read an image and its annotation: the project folder if it exists, else its masks.

    Raises RetinaInputError (one clear line) for a broken image. A broken mask costs only
    that mask: the lesion starts empty, `annotation.notes` says why, and its file is not
    overwritten until the grader edits that lesion.
    """
    project_dir = project_dir_for(record, project_root)
    project = ProjectFolder(project_dir)
    if project.exists():
        ann = project.load()
        rgb = read_fundus(project.image_path)
        if rgb.shape[:2] != tuple(ann.shape):
            ann = _resize_guard(ann, rgb)
        from_project = True
    else:
        rgb = read_fundus(record.image)
        ann = Annotation.empty(record.image.name, rgb.shape[:2])
        for code, path in record.masks.items():
            try:
                ann.masks[code] = read_mask(path, expected_shape=rgb.shape[:2])
            except RetinaInputError as e:
                leave_out(ann, code, str(e))
        if record.masks:
            # by file name: project files hold no path (io.project.without_paths)
            ann.provenance["initial_masks"] = {c: Path(p).name for c, p in sorted(record.masks.items())}
        from_project = False
    return OpenedImage(
        record=record,
        rgb=rgb,
        annotation=ann,
        project_dir=project_dir,
        from_project=from_project,
        dataset_root=dataset.root if dataset is not None else None,
    )


LABEL_SOURCES = ("reviewed", "ground truth", "left out")


def reviewed_lesions(project_dir: str | Path) -> dict[str, dict]:
    """{code: {"by", "when"}} of the lesions the grader marked as reviewed in a project (provenance.json)."""
    import json

    p = Path(project_dir) / "provenance.json"
    if not p.is_file():
        return {}
    try:
        reviewed = json.loads(p.read_text(encoding="utf-8")).get("reviewed", {})
    except (OSError, UnicodeDecodeError, ValueError, AttributeError):
        return {}
    return {str(k): v for k, v in reviewed.items()} if isinstance(reviewed, dict) else {}


def label_source(record: ImageRecord, code: str, project_root: str | Path | None = None) -> str:
    """Where the label of one lesion of one image comes from (`LABEL_SOURCES`), without reading pixels.

    "reviewed": its annotation project (beside the image, under `project_root`, or the one it
    lives in) marks the lesion as reviewed, so the grader's own pixels there are the label;
    "ground truth": else the data set's mask file, or no file for a lesion its data set
    annotates (IDRiD convention: no lesion); "left out": neither (never taken as a negative).
    """
    project = project_dir_for(record, project_root)
    if code in reviewed_lesions(project):
        return "reviewed"
    if record.project is None and (code in record.masks or code in record.truth):
        return "ground truth"  # a project's own mask files hold unreviewed work: not ground truth
    return "left out"


def graders_masks(
    record: ImageRecord, codes, shape: tuple[int, int], project_root: str | Path | None = None
) -> dict[str, np.ndarray | None]:
    """Lesions as labels for training and evaluation, {code: bool mask, or None when left out}.

    The rule of `label_source`: a reviewed lesion of an annotation project gives the grader's
    own pixels (painted, or proposals accepted), never model proposals left unaccepted; an
    unreviewed one falls back to the data set's ground truth; without either it is None.
    """
    sources = {code: label_source(record, code, project_root) for code in codes}
    out: dict[str, np.ndarray | None] = {}
    if "reviewed" in sources.values():
        project = project_dir_for(record, project_root)
        ann = ProjectFolder(project).load()
        if tuple(ann.shape) != tuple(shape):
            raise RetinaInputError(f"{project}: masks of {ann.shape[1]}x{ann.shape[0]}, image {shape[1]}x{shape[0]}")
        for code in codes:
            if sources[code] == "reviewed":
                if code in ann.unreadable:
                    raise RetinaInputError(ann.unreadable[code])
                out[code] = ann.record.hand(code)
    for code in codes:
        if sources[code] == "ground truth":
            out[code] = read_mask(record.masks[code], expected_shape=shape) if code in record.masks else np.zeros(shape, bool)
        elif sources[code] == "left out":
            out[code] = None
    return out


def graders_mask(record: ImageRecord, code: str, shape: tuple[int, int], project_root=None) -> np.ndarray | None:
    """One lesion of `graders_masks` (None: no label for it)."""
    return graders_masks(record, [code], shape, project_root)[code]


def _resize_guard(ann: Annotation, rgb: np.ndarray) -> Annotation:
    raise RetinaInputError(
        f"{ann.image_name}: the image is {rgb.shape[1]}x{rgb.shape[0]} but its annotation "
        f"is {ann.shape[1]}x{ann.shape[0]}"
    )


# --- napari layer data ------------------------------------------------------------------


# pending proposals: the lesion's colour, lighter and more transparent than confirmed pixels
PENDING_ALPHA = 0.45


def labels_colormap(code: str) -> dict:
    """A lesion layer's colours: confirmed pixels in the lesion's colour, pending ones lighter."""
    les = lesion(code)
    r, g, b = (v / 255 for v in les.rgb)
    light = tuple(round(v + (1 - v) * 0.55, 3) for v in (r, g, b))
    return {None: (0, 0, 0, 0), 0: (0, 0, 0, 0), les.label: les.colour, les.pending_label: (*light, PENDING_ALPHA)}


def lesion_layer_values(ann: Annotation, code: str) -> np.ndarray:
    """A lesion Labels layer's data: `label` where the grader confirmed a pixel (painted or
    accepted), `pending_label` where only a model's pending proposal claims it."""
    les = lesion(code)
    shown = ann.masks[code]
    if not ann.record.proposals:  # nothing pending: every pixel shown is the grader's
        return shown.astype(np.uint8) * np.uint8(les.label)
    data = shown.astype(np.uint8) * np.uint8(les.pending_label)
    data[ann.record.hand(code) & shown] = les.label
    return data


def _meta(opened: OpenedImage, role: str, **extra) -> dict:
    info = {
        "role": role,
        "image": str(opened.record.image),
        "project": str(opened.project_dir),
        "dataset": str(opened.dataset_root) if opened.dataset_root else None,
        **extra,
    }
    return {META_KEY: info}


def layer_data(opened: OpenedImage) -> list[tuple]:
    """napari LayerDataTuples: the RGB image, one Labels layer per lesion, the ellipses."""
    ann = opened.annotation
    # lesions whose mask file was unreadable: the annotator must not overwrite those files
    image_meta = _meta(opened, "image", unreadable=dict(ann.unreadable))
    out: list[tuple] = [(opened.rgb, {"name": opened.stem, "rgb": True, "metadata": image_meta}, "image")]
    for les in LESIONS:
        data = lesion_layer_values(ann, les.code)
        out.append(
            (
                data,
                {
                    "name": les.layer_name,
                    "colormap": labels_colormap(les.code),
                    "opacity": 0.7,
                    "metadata": _meta(opened, "lesion", lesion=les.code),
                },
                "labels",
            )
        )
    out.append(ellipses_layer_data(ann.ellipses, _meta(opened, "ellipses")))
    return out


def ellipses_layer_data(ef: EllipseFile, metadata: dict) -> tuple:
    corners = [ellipse_to_corners(e) for e in ef.ellipses]
    lesions_ = [e.lesion for e in ef.ellipses]
    ids = [str(e.extra.get("id", "")) for e in ef.ellipses]
    metadata = dict(metadata)
    metadata[META_KEY] = dict(metadata[META_KEY], extras={i: _extra(e) for i, e in zip(ids, ef.ellipses) if i})
    kwargs = {
        "name": ELLIPSES_LAYER,
        "shape_type": "ellipse",
        # object columns: an empty float column would refuse the "EX" default
        "features": {"lesion": np.array(lesions_, dtype=object), "id": np.array(ids, dtype=object)},
        "feature_defaults": {"lesion": LESION_CODES[0], "id": ""},
        "edge_color": [lesion(c).colour for c in lesions_] if lesions_ else lesion(LESION_CODES[0]).colour,
        "face_color": "transparent",
        "edge_width": 4,
        "metadata": metadata,
    }
    return (corners, kwargs, "shapes")


def _extra(e: Ellipse) -> dict:
    return {k: v for k, v in e.extra.items() if k != "id"}


def ellipses_from_shapes(
    data: list[np.ndarray],
    shape_types: list[str],
    lesions_: list[str],
    ids: list[str],
    extras: dict[str, dict],
    image_name: str,
    file_extra: dict | None = None,
) -> EllipseFile:
    """Shapes layer content -> EllipseFile; shapes other than ellipses are ignored."""
    ellipses = []
    for corners, kind, code, eid in zip(data, shape_types, lesions_, ids):
        if kind != "ellipse":
            continue
        extra = dict(extras.get(eid, {}))
        if eid:
            extra = {"id": eid, **extra}
        e = corners_to_ellipse(np.asarray(corners)[:, -2:], code, extra)
        ellipses.append(e)
    return EllipseFile(image=image_name, ellipses=ellipses, extra=dict(file_extra or {}))


# --- one annotation session per viewer ----------------------------------------------------------


class AnnotationSession:
    """What one viewer is annotating: folder, image, project, and the model version of each kind.

    Headless: the docks, the reader's layers and the commands bind to one instance per viewer
    (widgets.viewer_session.session_of) and never to each other. Listeners registered with
    `connect` hear of a model version put in use ("model": kind, folder) and of another image
    opened ("image": the OpenedImage), so every view agrees. Its `autosave` writes the open
    image's project; "saved" (project_dir, rows, error, snapshot) is heard in the writer thread
    when a save ends (a Qt view passes it on to its own thread).
    """

    EVENTS = ("model", "image", "saved")

    def __init__(self) -> None:
        self.dataset: Dataset | None = None
        self.index = -1
        self.opened: OpenedImage | None = None
        self.project_root: Path | None = None  # None: `<stem>.retina/` beside each image
        self._pinned: dict[str, Path] = {}  # kind -> a folder given by hand (command line, tests)
        self._confirmed_fundus: set[str] = set()  # images the grader let the models run on anyway
        self._noticed: set[str] = set()  # images already reported as not looking like a fundus photograph
        self._listeners: dict[str, list] = {e: [] for e in self.EVENTS}
        self.autosave = ProjectAutosave(on_done=lambda *result: self.emit("saved", *result))
        # ellipse id -> what a Shapes layer cannot hold for it (author, created, imported fields)
        self.ellipse_extras: dict[str, dict] = {}

    # --- listeners ---------------------------------------------------------------------------
    def connect(self, event: str, callback) -> None:
        if event not in self._listeners:
            raise ValueError(f"unknown session event {event!r}; known: {', '.join(self.EVENTS)}")
        if callback not in self._listeners[event]:
            self._listeners[event].append(callback)

    def disconnect(self, event: str, callback) -> None:
        try:
            self._listeners[event].remove(callback)
        except (KeyError, ValueError):
            pass

    def emit(self, event: str, *args) -> None:
        for cb in list(self._listeners[event]):
            cb(*args)

    # --- the folder and image open now ----------------------------------------------------------
    @property
    def data_folder(self) -> Path | None:
        """The folder the grader is working in (a data set's root, else the open image's folder)."""
        if self.dataset is not None:
            return self.dataset.root
        if self.opened is not None:
            return self.opened.record.image.parent
        return None

    def neighbour(self, step: int) -> int | None:
        """The index of the image `step` places from the open one in its folder (None: there is none)."""
        if self.dataset is None:
            return None
        i = self.index + step
        return i if 0 <= i < len(self.dataset) and i != self.index else None

    def image_names(self) -> list[str]:
        """The images the grader steps through: the folder's, or the one image open."""
        if self.dataset is not None:
            return [r.image.name for r in self.dataset.records]
        return [self.opened.record.image.name] if self.opened is not None else []

    def set_opened(self, opened: OpenedImage | None, dataset: Dataset | None = None, index: int = -1) -> None:
        self.opened, self.dataset, self.index = opened, dataset, index
        self.emit("image", opened)

    # --- the open image's ellipses, as data ------------------------------------------------------
    @property
    def ellipses(self) -> EllipseFile | None:
        """The open image's ellipses (`Annotation.ellipses`, kept current by `update_ellipses`)."""
        return self.opened.annotation.ellipses if self.opened is not None else None

    def update_ellipses(self, data, shape_types, lesions_, ids) -> EllipseFile:
        """The ellipses as a Shapes layer (their editor in napari) holds them now: corners, shape
        types, lesion and id per shape; shapes other than ellipses are left out."""
        op = self.opened
        ann = op.annotation
        if len(data) == 0:
            ef = EllipseFile(image=op.record.image.name, ellipses=[], extra=ann.ellipses.extra)
        else:
            ef = ellipses_from_shapes(list(data), list(shape_types), [str(x) for x in lesions_], [str(x) for x in ids],
                                      self.ellipse_extras, op.record.image.name, ann.ellipses.extra)
        ann.ellipses = ef
        return ef

    def current_ellipses(self) -> dict[str, Ellipse]:
        """{id: Ellipse} of the open image's ellipses that have an id."""
        ef = self.ellipses
        return {} if ef is None else {str(e.extra["id"]): e for e in ef.ellipses if e.extra.get("id")}

    # --- images that do not look like a fundus photograph ------------------------------------
    def fundus_confirmed(self, opened: OpenedImage) -> bool:
        """May the lesion models run on `opened`? Yes unless its field of view is not round and the
        grader has not said to go on."""
        return opened.fundus is not False or str(opened.record.image) in self._confirmed_fundus

    def confirm_fundus(self, opened: OpenedImage) -> None:
        self._confirmed_fundus.add(str(opened.record.image))

    def first_notice(self, opened: OpenedImage) -> bool:
        """True the first time an image that does not look like a fundus photograph is reported."""
        key = str(opened.record.image)
        if opened.fundus is not False or key in self._noticed:
            return False
        self._noticed.add(key)
        return True

    # --- model versions in use (registry.KINDS) --------------------------------------------------
    def model_dir(self, kind: str) -> Path:
        """The folder the next run of `kind` loads: one pinned by hand, else the version in use."""
        from .models.versions import current_model_dir

        if kind in self._pinned:
            return self._pinned[kind]
        return current_model_dir(kind)

    def model_version(self, kind: str) -> str:
        """The version name of the folder the next run of `kind` loads (its config.json's, else the folder's)."""
        import json

        folder = self.model_dir(kind)
        try:
            return str(json.loads((folder / "config.json").read_text(encoding="utf-8")).get("version", folder.name))
        except (OSError, ValueError, AttributeError):
            return folder.name

    def pin_model(self, kind: str, folder: str | Path | None) -> None:
        """Run `kind` from `folder` in this session only (None: back to the version in use)."""
        if folder is None:
            self._pinned.pop(kind, None)
        else:
            self._pinned[kind] = Path(folder)
        self.emit("model", kind, self.model_dir(kind))

    def use_model(self, kind: str, folder: str | Path) -> Path:
        """Put a checked version of `kind` in use (saved for later sessions too); every live model
        of that kind loads it on its next call. Raises ModelFolderError (one line) for a bad folder."""
        from .models.versions import select

        folder = select(kind, folder)
        self._pinned.pop(kind, None)
        self.emit("model", kind, folder)
        return folder


def looks_like_fundus(fov: np.ndarray) -> bool:
    """Does a field-of-view mask (fundus.field_of_view_mask) show a fundus photograph's round aperture?

    A colour fundus photograph is a bright disc (often cut flat at top and bottom) on a dark
    surround: its image corners lie outside the field of view, which fills 60-97 % of its own
    bounding box (a full disc 79 %). An image without a dark surround gets an all-True mask.
    """
    fov = np.asarray(fov, bool)
    h, w = fov.shape
    if not fov.any() or fov.all():
        return False
    k = max(1, min(h, w) // 50)
    corners = [fov[:k, :k], fov[:k, -k:], fov[-k:, :k], fov[-k:, -k:]]
    if any(c.mean() > 0.5 for c in corners):
        return False
    rows, cols = np.flatnonzero(fov.any(axis=1)), np.flatnonzero(fov.any(axis=0))
    bh, bw = rows[-1] - rows[0] + 1, cols[-1] - cols[0] + 1
    fill = fov.sum() / float(bh * bw)
    return bool(0.6 <= fill <= 0.97 and bw >= 0.3 * w)


# --- autosave of the open image's project ------------------------------------------------------

SAVE_WHEN_QUIET_S = 0.5  # a burst of edits is written once it pauses...
SAVE_AT_LATEST_S = 1.5  # ...or this long after its first unsaved edit: a crash loses at most ~2 s
SUMMARY_EVERY_S = 5.0  # overlay.png and lesions.csv are whole-image work: at most this often,
SUMMARY_WHEN_QUIET_S = 1.0  # while the grader pauses (and no model is running),
SUMMARY_AT_LATEST_S = 30.0  # or anyway this long after the masks changed


class ProjectAutosave:
    """When and what of the open image's project to write, written in one background thread.

    Headless: whoever shows the session calls `edited` on every change and `due` on a timer,
    then `save`. Each save copies only what the record says changed (`Annotation.snapshot`) and
    writes it in the one writer thread, so successive saves of a project land in order and the
    caller never waits on the disk. `on_done(project_dir, rows, error, snapshot)` is called in
    the writer thread when a save ends (rows: the lesion counts, or None; error: one line, or
    None); after an error, `give_back` makes the snapshot's changes unsaved again.
    """

    def __init__(self, on_done) -> None:
        self._executor = None  # one writer thread, made on first use (again after `shutdown`)
        self._on_done = on_done
        self._pending: list = []
        self.writer = None  # io.project.ProjectWriter of the open image, used only in the writer thread
        self.started = False  # the project folder was written (or restored): later saves write only changes
        self.saved_ellipses: list[dict] | None = None
        self.ellipses_dirty = False  # the ellipses changed since the last save
        self.first_unsaved: float | None = None  # monotonic time of the oldest unsaved edit
        self.last_edit = 0.0
        self.summary_since: float | None = None  # masks changed since overlay/lesions.csv were written
        self.last_summary = 0.0

    # --- what the session tells it ----------------------------------------------------------------
    def begin(self, opened: OpenedImage, ellipse_dicts: list[dict], grader: str) -> None:
        """Another image is open: what is shown now is the baseline (a project is written only once
        the grader edits, so browsing a read-only data set creates nothing)."""
        from .io.project import ProjectWriter

        opened.annotation.record.take_changes()
        self.saved_ellipses, self.ellipses_dirty = ellipse_dicts, False
        self.first_unsaved = self.summary_since = None
        self.started = opened.from_project
        self.writer = ProjectWriter(opened.project_dir, opened.record.image, opened.rgb, opened.annotation,
                                    grader=grader)  # it keeps the confirmed pixels

    def move_to(self, opened: OpenedImage, grader: str) -> None:
        """The open image's project now goes to `opened.project_dir` (a new folder gets every file)."""
        from .io.project import ProjectWriter

        opened.from_project = False
        self.saved_ellipses, self.ellipses_dirty = None, True
        self.started = False
        self.writer = ProjectWriter(opened.project_dir, opened.record.image, opened.rgb, opened.annotation,
                                    grader=grader)  # it keeps the confirmed pixels

    def edited(self, now: float | None = None) -> None:
        import time

        now = time.monotonic() if now is None else now
        self.last_edit = now
        if self.first_unsaved is None:
            self.first_unsaved = now

    def ellipses_edited(self) -> None:
        self.ellipses_dirty = True
        self.edited()

    # --- when ---------------------------------------------------------------------------------------
    @property
    def writing(self) -> bool:
        return any(not f.done() for f in self._pending)

    def has_unsaved_changes(self, opened: OpenedImage | None) -> bool:
        """Edits not yet on disk: unsaved in memory, or a save still being written."""
        if opened is None:
            return False
        return self.writing or opened.annotation.record.has_changes() or self.ellipses_dirty

    def due(self, opened: OpenedImage | None, now: float, busy: bool = False) -> str | None:
        """"save" once a burst of edits pauses (or ~1.5 s after it began), "summary" when overlay.png
        and lesions.csv are due (not while a model is `busy`), else None."""
        if opened is None or self.writing:
            return None
        if opened.annotation.record.has_changes() or self.ellipses_dirty:
            if self.first_unsaved is None:
                self.first_unsaved = self.last_edit = now
            if now - self.last_edit >= SAVE_WHEN_QUIET_S or now - self.first_unsaved >= SAVE_AT_LATEST_S:
                return "save"
        elif self.summary_since is not None:
            quiet = now - self.last_edit >= SUMMARY_WHEN_QUIET_S and not busy
            if now - self.last_summary >= SUMMARY_EVERY_S and (quiet or now - self.summary_since >= SUMMARY_AT_LATEST_S):
                return "summary"
        return None

    # --- what -----------------------------------------------------------------------------------------
    def save(self, opened: OpenedImage | None, ellipse_file, grader: str, summary: bool = False, counts: bool = True):
        """Queue a save of what changed (plus overlay.png and lesions.csv if `summary`); its Future, or
        None when there is nothing to write. `ellipse_file()` gives the ellipses as they are now."""
        import time

        writer = self.writer
        if opened is None or writer is None:
            return None
        ellipses = None
        if self.ellipses_dirty or not self.started or self.saved_ellipses is None:
            ellipses = ellipse_file()
            dicts = [e.to_dict() for e in ellipses.ellipses]
            if dicts == self.saved_ellipses and self.started:
                ellipses = None  # e.g. a shape selected, nothing moved
            self.saved_ellipses, self.ellipses_dirty = dicts, False
        snap = opened.annotation.snapshot(ellipses=ellipses, all_lesions=not self.started)
        self.first_unsaved = None
        if not snap.has_content() and not summary and self.started:
            return None  # e.g. a shape selected: nothing to write
        self.started = True
        if snap.masks:
            self.summary_since = self.summary_since or time.monotonic()
        if summary:
            self.summary_since, self.last_summary = None, time.monotonic()
        project_dir, on_done = opened.project_dir, self._on_done

        def write():
            try:
                rows = writer.write(snap, summary=summary, grader=grader, counts=counts)
                on_done(project_dir, rows, None, snap)
            except RetinaInputError as e:
                on_done(project_dir, None, str(e), snap)
            except Exception as e:  # never a traceback dialog from a background save
                on_done(project_dir, None, f"saving {project_dir.name} failed: {e}", snap)

        fut = self._submit(write)
        self._pending = [f for f in self._pending if not f.done()] + [fut]
        return fut

    def _submit(self, fn):
        from concurrent.futures import ThreadPoolExecutor

        if self._executor is None:
            self._executor = ThreadPoolExecutor(max_workers=1, thread_name_prefix="napari-retina-save")
        return self._executor.submit(fn)

    def give_back(self, opened: OpenedImage, snap) -> None:
        """A save failed: what it took is unsaved again, and the next tick retries."""
        import time

        ann = opened.annotation
        ann.record.give_back(snap.changes)
        ann.legacy_sources = ann.legacy_sources or snap.drop_legacy_sources
        self.saved_ellipses, self.ellipses_dirty = None, True
        self.started = self.started and opened.from_project
        self.first_unsaved = self.first_unsaved or time.monotonic()

    def count(self, fov, on_counted) -> None:
        """Lesion counts as % of the field of view, from the writer's copy of the masks, in its thread:
        `on_counted(writer, rows)`."""
        writer = self.writer
        if writer is None:
            return

        def count():
            writer.set_fov(fov)
            on_counted(writer, writer.counts())

        self._submit(count)

    def pending(self) -> list:
        """The Futures of the saves not yet on disk."""
        return [f for f in self._pending if not f.done()]

    def wait(self, timeout: float = 30.0) -> None:
        for f in list(self._pending):
            f.result(timeout=timeout)

    def flush(self, opened: OpenedImage | None, ellipse_file, grader: str, timeout: float = 30.0) -> None:
        """Write everything now, overlay and lesion table included, and wait."""
        if self.has_unsaved_changes(opened) or self.summary_since is not None:
            self.wait(timeout)
            self.save(opened, ellipse_file, grader, summary=True)
        self.wait(timeout)

    def shutdown(self) -> None:
        """Wait for the writes queued and end the writer thread (a later save starts another)."""
        if self._executor is not None:
            self._executor.shutdown(wait=True)
            self._executor = None
