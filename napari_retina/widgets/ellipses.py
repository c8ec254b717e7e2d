"""The ellipses layer of the annotator dock: the grader's editor of the session's ellipses.

napari's Shapes layer draws, moves, copies and deletes them; this class gives each new shape
an id, an author and its lesion's colour, keeps the session's ellipses (as data) up to date,
tells the refinement which ellipses appeared, moved or went, and tells autosave that they
changed. Importing an ellipse file adds its ellipses here.
"""

from __future__ import annotations

import functools
import weakref
from pathlib import Path

import numpy as np
from napari.layers import Shapes
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject
from qtpy.QtGui import QColor

from ..io.ellipses import Ellipse, EllipseFile, ellipse_to_corners, load_ellipses, new_id
from ..io.errors import RetinaInputError
from ..io.project import now_iso
from ..lesions import lesion
from ..session import META_KEY
from .lesion_layers import LesionLayers
from .refine import EllipseRefinement, ellipse_key


@functools.lru_cache(maxsize=None)
def edge_rgba(code: str) -> tuple[float, float, float, float]:
    """An ellipse's edge colour: its lesion's, as napari's RGBA floats (one per lesion, not per shape)."""
    return QColor(lesion(code).colour).getRgbF()


class EllipseEditing(QObject):
    """Forwards the ellipses layer's edits to the session's ellipses, the refinement and autosave."""

    def __init__(self, layers: LesionLayers, refinement: EllipseRefinement, grader, loading, parent=None):
        """`grader()`: the name new ellipses are credited to; `loading()`: True while the dock
        replaces the image (its layer events are not the grader's edits)."""
        super().__init__(parent)
        self.layers, self.refinement = layers, refinement
        self.session = layers.session
        self._grader, self._loading = grader, loading
        self._armed_id = ""  # the id a shape drawn next gets (see label_new_shapes)
        self._labelling = False
        self._connected: "weakref.WeakSet[Shapes]" = weakref.WeakSet()

    @property
    def shapes(self) -> Shapes | None:
        return self.layers.ellipses_layer

    def connect_layer(self, shapes: Shapes) -> None:
        """Follow `shapes` (once per layer); its metadata holds what the reader read for each ellipse."""
        if shapes not in self._connected:
            shapes.events.data.connect(self._on_data)
            shapes.events.features.connect(self._on_features)
            self._connected.add(shapes)
        self.session.ellipse_extras = dict(shapes.metadata.get(META_KEY, {}).get("extras", {}))

    # --- the session's ellipses, as data ---------------------------------------------------------
    def ellipse_file(self) -> EllipseFile:
        """The open image's ellipses, brought up to date from the layer."""
        shapes = self.shapes
        if shapes is None or len(shapes.data) == 0:
            return self.session.update_ellipses([], [], [], [])
        feats = shapes.features
        return self.session.update_ellipses(shapes.data, shapes.shape_type, feats["lesion"], feats["id"])

    def current(self) -> dict[str, Ellipse]:
        """{id: Ellipse} as the layer holds them now."""
        if self.session.opened is None or self.shapes is None:
            return {}
        self.ellipse_file()
        return self.session.current_ellipses()

    def keys(self) -> dict:
        return {k: ellipse_key(e) for k, e in self.current().items()}

    # --- the lesion class of the next ellipse ---------------------------------------------------
    def set_class(self, code: str) -> None:
        shapes = self.shapes
        if shapes is None:
            return
        shapes.feature_defaults["lesion"] = code
        shapes.current_edge_color = lesion(code).colour
        if "id" in shapes.feature_defaults and str(shapes.feature_defaults["id"].iloc[0]) != self._armed_id:
            self.arm_new_shape()  # a new layer, or one whose defaults were set by an import

    def arm_new_shape(self) -> None:
        """The id the next drawn shape takes (napari copies feature defaults into a new row)."""
        shapes = self.shapes
        if shapes is not None and "id" in shapes.feature_defaults:
            self._armed_id = new_id()
            shapes.feature_defaults["id"] = self._armed_id

    # --- the layer's events ------------------------------------------------------------------------
    def _on_data(self, event) -> None:
        self.session.autosave.ellipses_edited()
        action = str(getattr(event, "action", ""))
        if action in ("added", "ActionType.ADDED"):
            self.label_new_shapes()
        if action.lower().endswith(("added", "changed", "removed")) and not self._loading():
            self.refinement.sync(self.current())

    def _on_features(self, event=None) -> None:
        """napari's paste adds shapes with a features event only, carrying the copied ids."""
        self.session.autosave.ellipses_edited()
        shapes = self.shapes
        if self._labelling or self._loading() or shapes is None or "id" not in shapes.features:
            return
        ids = [str(x) for x in shapes.features["id"]]
        if len(set(ids)) != len(ids) or any(not i or i == "nan" for i in ids):
            self.label_new_shapes()
            self.refinement.sync(self.current())

    def label_new_shapes(self) -> None:
        """Give each new shape its id, author and lesion colour; rewrite the layer only where needed.

        A drawn ellipse arrives with the id armed in the layer's feature defaults and the
        lesion colour already current, so nothing is rewritten then (a rewrite recolours and
        re-rasterises every shape: about 10 ms per ellipse before its refinement can start).
        Shapes without an id, or pasted copies carrying another's, get a fresh one.
        """
        shapes = self.shapes
        feats = shapes.features
        if "id" not in feats or "lesion" not in feats:
            return
        grader = self._grader()
        extras = self.session.ellipse_extras
        seen: set[str] = set()
        rewrite = False
        for i, value in enumerate(feats["id"]):
            eid = str(value)
            new = eid == self._armed_id
            if not eid or eid == "nan" or eid in seen:
                eid, new, rewrite = new_id(), True, True
                feats.at[i, "id"] = eid
            seen.add(eid)
            if new and eid not in extras:
                extras[eid] = {"author": grader, "created": now_iso()}
        self._labelling = True  # our own rewrite's features event is not a paste
        try:
            if rewrite:
                shapes.features = feats
            colours = np.asarray(shapes.edge_color)
            want = np.array([edge_rgba(str(c)) for c in feats["lesion"]]).reshape(-1, 4)
            if colours.shape != want.shape or not np.allclose(colours, want, atol=2e-3):
                shapes.edge_color = want
        finally:
            self._labelling = False
        self.arm_new_shape()

    # --- an ellipse file ----------------------------------------------------------------------------
    def import_file(self, path: str | Path, current_code: str, refine: bool = False) -> int:
        """Add the ellipses of an ellipse JSON file; "Refine all" (or `refine`) turns them into masks."""
        try:
            ef = load_ellipses(path)
        except RetinaInputError as e:
            show_error(str(e))
            return 0
        shapes = self.shapes
        if shapes is None or self.session.opened is None:
            return 0
        extras = self.session.ellipse_extras
        was = self.refinement.enabled
        self.refinement.enabled = refine
        try:
            for e in ef.ellipses:
                eid = str(e.extra.get("id") or new_id())
                if eid in extras or eid in set(map(str, shapes.features["id"])):
                    eid = new_id()  # ids are unique per image
                extras[eid] = {k: v for k, v in e.extra.items() if k != "id"}
                shapes.feature_defaults["lesion"] = e.lesion
                shapes.feature_defaults["id"] = eid
                shapes.current_edge_color = lesion(e.lesion).colour
                shapes.add(ellipse_to_corners(e), shape_type="ellipse")
        finally:
            shapes.feature_defaults["id"] = ""
            self.refinement.enabled = was
            self.set_class(current_code)
        if not refine:
            # loaded, not refined: "Refine all" does it on request
            self.refinement.known.update({k: v for k, v in self.keys().items() if k not in self.refinement.known})
        show_info(f"{len(ef.ellipses)} ellipses imported from {Path(path).name}")
        return len(ef.ellipses)
