"""The napari layers of one viewer's annotation session, and the forwarding between them and its record.

One Labels layer per lesion shows two values: the grader's confirmed pixels (`lesion.label`)
and model proposals still pending (`lesion.pending_label`, drawn lighter). Brush, eraser, fill
and undo on those layers go to the image's `PixelRecord` as the grader's doing; the record's
changes (a refined ellipse, a segmenter's block, an accepted candidate) come back as boxes
that are painted here. Every part of the annotator dock (ellipse refinement, the finders, the
microaneurysm tools) works through this object, never through the dock itself.
"""

from __future__ import annotations

import weakref

import numpy as np
from napari.layers import Image, Labels, Layer, Shapes
from qtpy.QtCore import QObject, QTimer, Signal

from ..lesions import lesion
from ..proposals import PixelChange
from ..session import META_KEY, AnnotationSession, OpenedImage
from .labels_region import write_box

# the roles of the layers that belong to the image open now (replaced when another opens)
IMAGE_ROLES = ("image", "lesion", "ellipses", "fov", "probability", "candidates")


def layer_role(layer: Layer) -> str | None:
    info = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    return info.get("role") if isinstance(info, dict) else None


def layer_image(layer: Layer) -> str | None:
    """The image path a reader or the dock stamped on a layer (None for layers of neither)."""
    info = layer.metadata.get(META_KEY) if isinstance(layer.metadata, dict) else None
    return info.get("image") if isinstance(info, dict) else None


class LesionLayers(QObject):
    """The layers of the image a session has open, and what passes between them and its record."""

    edited = Signal()  # the record or the ellipses changed: autosave is due
    message = Signal(str)  # one status line for the dock
    lesion_wanted = Signal(str)  # a tool asks for this lesion class to be the active one

    def __init__(self, viewer, session: AnnotationSession, parent: QObject | None = None):
        super().__init__(parent)
        self.viewer = viewer
        self.session = session
        self.fov: np.ndarray | None = None  # the open image's field of view, once computed
        self.writing = False  # our own box writes: not the grader's edits
        self._resync_due: set[str] = set()
        self._owned: "weakref.WeakSet[Layer]" = weakref.WeakSet()  # the open image's layers
        self._connected: "weakref.WeakSet[Layer]" = weakref.WeakSet()  # lesion layers forwarded to the record

    def own(self, layer: Layer) -> None:
        """`layer` belongs to the image the session has open (a reader's new layers do not, yet)."""
        self._owned.add(layer)

    def owns(self, layer: Layer) -> bool:
        return layer in self._owned

    @property
    def opened(self) -> OpenedImage | None:
        return self.session.opened

    # --- finding layers ---------------------------------------------------------------------
    def layers_with_role(self, role: str) -> list[Layer]:
        return [layer for layer in self.viewer.layers if layer_role(layer) == role]

    @property
    def image_layer(self) -> Image | None:
        found = self.layers_with_role("image")
        return found[0] if found else None

    @property
    def ellipses_layer(self) -> Shapes | None:
        found = self.layers_with_role("ellipses")
        return found[0] if found else None

    def lesion_layer(self, code: str) -> Labels | None:
        for layer in self.layers_with_role("lesion"):
            if layer.metadata[META_KEY].get("lesion") == code:
                return layer
        return None

    # --- what tools tell the dock ---------------------------------------------------------------
    def mark_edited(self) -> None:
        self.edited.emit()

    def say(self, text: str) -> None:
        self.message.emit(text)

    def want_lesion(self, code: str) -> None:
        self.lesion_wanted.emit(code)

    # --- record -> layers -----------------------------------------------------------------------
    def show_changes(self, changes) -> None:
        """Paint the boxes the record changed into the lesion layers (only those boxes are redrawn)."""
        op = self.opened
        if op is None:
            return
        changed = False
        record = op.annotation.record
        self.writing = True
        try:
            for change in changes:
                if not isinstance(change, PixelChange):
                    continue
                changed = True
                layer = self.lesion_layer(change.lesion)
                if layer is None:
                    continue
                les = lesion(change.lesion)
                write_box(layer, change, op.annotation.masks[change.lesion][change.slices],
                          record.hand_region(change.lesion, change.box), les.label, les.pending_label)
        finally:
            self.writing = False
        if changed:
            self.mark_edited()

    # --- layers -> record -------------------------------------------------------------------------
    def connect_lesion_layer(self, layer: Labels, code: str) -> None:
        """Forward the grader's strokes and undo on `layer` to the record (once per layer)."""
        if layer in self._connected:
            return
        layer.events.paint.connect(self._paint_handler(code))
        layer.events.set_data.connect(self._data_handler(code))
        self._connected.add(layer)

    def _paint_handler(self, code: str):
        """Brush, eraser, fill and polygon strokes go to the record (napari sends what changed)."""

        def on_paint(event) -> None:
            op = self.opened
            if op is None or self.writing:
                return
            record = op.annotation.record
            for atom in event.value:
                box, painted, erased = atom_pixels(atom)
                if box is not None:
                    record.hand_edit(code, box, painted=painted, erased=erased)
            self.mark_edited()

        return on_paint

    def _data_handler(self, code: str):
        """Undo, redo or new data reach the layer without a paint event: compare once, soon."""

        def on_set_data(event) -> None:
            if self.writing or self.opened is None or code in self._resync_due:
                return
            self._resync_due.add(code)
            QTimer.singleShot(0, lambda: self.resync(code))

        return on_set_data

    def resync(self, code: str) -> None:
        """Take whatever the layer shows that the record does not know as the grader's doing:
        pixels shown or not (undo of a stroke, redo), and pixels back from confirmed to pending
        (undo of a stroke over pending pixels)."""
        self._resync_due.discard(code)
        op, layer = self.opened, self.lesion_layer(code)
        if op is None or layer is None or layer.data.shape != tuple(op.annotation.shape):
            return
        record = op.annotation.record
        data = np.asarray(layer.data)
        now = data != 0
        changes, edited = [], False
        box = _diff_box(now != op.annotation.masks[code])
        if box is not None:
            changes.append(record.hand_set(code, box, now[box[0] : box[1], box[2] : box[3]]))
            edited = True
        if record.proposals:
            pending_now = data == lesion(code).pending_label
            back = _diff_box(pending_now & record.hand(code))
            if back is not None:
                r0, r1, c0, c1 = back
                changes.append(record.hand_release(code, back, pending_now[r0:r1, c0:c1]))
                edited = True
        if edited:
            self.mark_edited()
        changes = [c for c in changes if c is not None]
        if changes:  # redrawn from the record: what the grader brought back is theirs
            self.show_changes(changes)


def _diff_box(diff: np.ndarray) -> tuple[int, int, int, int] | None:
    rows = np.flatnonzero(diff.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(diff.any(axis=0))
    return int(rows[0]), int(rows[-1]) + 1, int(cols[0]), int(cols[-1]) + 1


def atom_pixels(atom) -> tuple[tuple | None, np.ndarray | None, np.ndarray | None]:
    """(box, painted pixels of the box, erased pixels of the box) of one napari Labels history atom.

    napari's paint event hands its undo atoms, whose fields (`slice_key`, `mask`, `new_value`, or
    an (indices, old, new) tuple) are not a public API: they are the only account of what a stroke
    changed without comparing the whole image, hence napari's upper version pin in pyproject.toml."""
    if hasattr(atom, "slice_key"):  # mask-based atom (brush, fill, polygon): one new value
        key = atom.slice_key[-2:]
        box = (key[0].start, key[0].stop, key[1].start, key[1].stop)
        shape = (box[1] - box[0], box[3] - box[2])
        changed = np.ones(shape, bool) if atom.mask is None else np.asarray(atom.mask, bool).reshape(shape)
        return (box, changed, None) if atom.new_value != 0 else (box, None, changed)
    idx, _, new = atom  # (indices, old values, new values), as data_setitem records it
    rows, cols = (np.asarray(i) for i in idx[-2:])
    if rows.size == 0:
        return None, None, None
    new = np.broadcast_to(np.asarray(new), rows.shape)
    box = (int(rows.min()), int(rows.max()) + 1, int(cols.min()), int(cols.max()) + 1)
    painted = np.zeros((box[1] - box[0], box[3] - box[2]), bool)
    erased = painted.copy()
    painted[rows - box[0], cols - box[2]] = new != 0
    erased[rows - box[0], cols - box[2]] = new == 0
    return box, painted, erased


__all__ = ["IMAGE_ROLES", "LesionLayers", "atom_pixels", "layer_image", "layer_role"]
