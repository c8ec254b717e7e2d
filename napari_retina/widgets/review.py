"""Tools for lesions a few pixels across (microaneurysms): click to add or remove, review candidates one by one.

- "Click tool": a click on the image adds a microaneurysm at the dark centre near it (a disc
  sized from the image); a click on one removes it (a model candidate is rejected and
  remembered). Dragging still pans.
- "Review": steps through the detector's candidates, most probable first, zoomed in on each;
  A accepts, R rejects, N goes to the next without deciding. The counts of accepted, rejected
  and pending candidates are always shown.
- A Points layer ("MA candidates") rings every pending candidate at a fixed screen size, so
  lesions a few pixels across stay visible when the whole photograph is in view. It holds no
  state of its own: it is redrawn from the record after every change.

The pixel logic is headless (`segmentation.click_lesion`, `review_queue`, `review_counts`,
`PixelRecord.decide`); this widget forwards clicks and keys and paints the boxes that change.
Everything lands in the project folder through the record (decisions included) and comes back
on reopen.
"""

from __future__ import annotations

from napari.utils.notifications import show_info
from qtpy.QtCore import Qt
from qtpy.QtGui import QKeySequence
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QPushButton, QShortcut

from .lesion_layers import LesionLayers

REVIEW_ZOOM = 3.0  # screen pixels per image pixel while reviewing: an 18-px microaneurysm shows 54 px wide
REVIEW_CONTOUR = 1  # the lesion layer outlined while reviewing: a filled candidate hides the dark dot to judge
# (the probability overlay and the candidate rings, which would cover it too, are hidden while reviewing)
KEYS = {"a": "accept", "r": "reject", "n": "next"}


class LesionReview(QGroupBox):
    """Click tool and candidate review for one small-lesion class (MA)."""

    def __init__(self, layers: LesionLayers, code: str = "MA", overlay_layer=lambda: None):
        super().__init__("Microaneurysm tools")
        self.layers, self.code = layers, code
        self._overlay_layer = overlay_layer  # the finder's probability overlay (hidden while reviewing)
        self.reviewing = False
        self.current: int | None = None  # the proposal under review
        self._skipped: set[int] = set()
        self._contour_before: int | None = None  # the lesion layer's contour before review outlined it
        self._hidden: list = []  # the layers review hid (overlay, rings), shown again when it ends
        self._shortcuts: list[QShortcut] = []
        lay = QGridLayout(self)
        self.click_button = QPushButton("Click tool")
        self.click_button.setCheckable(True)
        self.click_button.setToolTip("click: add a microaneurysm at the dark spot; click one: remove it")
        self.click_button.toggled.connect(self._on_click_tool)
        self.review_button = QPushButton("Review")
        self.review_button.setCheckable(True)
        self.review_button.setToolTip("step through the candidates, most probable first (A accept, R reject, N next)")
        self.review_button.toggled.connect(self._on_review)
        self.accept_button = QPushButton("Accept (A)")
        self.reject_button = QPushButton("Reject (R)")
        self.next_button = QPushButton("Next (N)")
        self.accept_button.clicked.connect(self.accept)
        self.reject_button.clicked.connect(self.reject)
        self.next_button.clicked.connect(self.next)
        self.counts_label = QLabel("")
        self.counts_label.setWordWrap(True)
        # the review's three buttons on one row: the dock fits a 1000-px-high window
        lay.addWidget(self.click_button, 0, 0, 1, 3)
        lay.addWidget(self.review_button, 0, 3, 1, 3)
        lay.addWidget(self.accept_button, 1, 0, 1, 2)
        lay.addWidget(self.reject_button, 1, 2, 1, 2)
        lay.addWidget(self.next_button, 1, 4, 1, 2)
        lay.addWidget(self.counts_label, 2, 0, 1, 6)
        self._enable_review_buttons()

    # --- state shown ---------------------------------------------------------------------------
    def record(self):
        op = self.layers.opened
        return None if op is None else op.annotation.record

    def update_counts(self) -> None:
        from ..segmentation import review_counts

        rec = self.record()
        if rec is None:
            self.counts_label.setText("")
            return
        n = review_counts(rec, self.code)
        self.update_points()
        where = ""
        if self.reviewing and self.current is not None:
            where = f" - candidate {self._position()}"
        self.counts_label.setText(f"accepted {n['accepted']} · rejected {n['rejected']} · pending {n['pending']}{where}")

    def points_layer(self):
        for layer in self.layers.viewer.layers:
            meta = layer.metadata.get("napari_retina", {})
            if meta.get("role") == "candidates" and meta.get("lesion") == self.code:
                return layer
        return None

    def update_points(self) -> None:
        """Ring each pending candidate (the record's), or remove the layer when there is none."""
        import numpy as np

        from ..segmentation import review_queue

        rec = self.record()
        layer = self.points_layer()
        ids = review_queue(rec, self.code) if rec is not None else []
        if not ids:
            if layer is not None:
                self.layers.viewer.layers.remove(layer)
            return
        centres = np.array([rec.proposals[i].description.get("centre", [0, 0]) for i in ids], float)
        scores = np.array([float(rec.proposals[i].description.get("score", 0.0)) for i in ids])
        if layer is None:
            active = self.layers.viewer.layers.selection.active
            layer = self.layers.viewer.add_points(
                centres, name=f"{self.code} candidates", size=14, symbol="ring", face_color="#00e5ff",
                border_width=0, opacity=0.9, canvas_size_limits=(6, 40), visible=not self.reviewing,
                metadata={"napari_retina": {"role": "candidates", "lesion": self.code}},
            )
            layer.size = 14
            self.layers.viewer.layers.selection.active = active  # painting stays where it was
        else:
            layer.data = centres
        layer.features = {"score": scores}
        layer.refresh()

    def _position(self) -> str:
        from ..segmentation import review_queue

        q = review_queue(self.record(), self.code)
        p = self.record().proposals.get(self.current)
        score = "" if p is None else f", p = {float(p.description.get('score', 0)):.2f}"
        return f"{q.index(self.current) + 1} of {len(q)}{score}" if self.current in q else "-"

    def _enable_review_buttons(self) -> None:
        for b in (self.accept_button, self.reject_button, self.next_button):
            b.setEnabled(self.reviewing)

    def image_changed(self) -> None:
        self.click_button.setChecked(False)  # the tool sat on the previous image's layer
        self.review_button.setChecked(False)
        self.current = None
        self._skipped.clear()
        self.update_counts()

    # --- click tool ----------------------------------------------------------------------------
    def _on_click_tool(self, on: bool) -> None:
        layer = self.layers.lesion_layer(self.code)
        if layer is None:
            self.click_button.setChecked(False)
            return
        if on:
            self.layers.want_lesion(self.code)
            layer.mode = "pan_zoom"  # a drag pans; a click without moving adds or removes
            if self._on_mouse not in layer.mouse_drag_callbacks:
                layer.mouse_drag_callbacks.append(self._on_mouse)
        elif self._on_mouse in layer.mouse_drag_callbacks:
            layer.mouse_drag_callbacks.remove(self._on_mouse)

    def _on_mouse(self, layer, event):
        # only in pan/zoom: with napari's paint or erase tool picked, a click is theirs
        if event.button != 1 or not self.click_button.isChecked() or layer.mode != "pan_zoom":
            return
        yield
        moved = False
        while event.type == "mouse_move":
            moved = True
            yield
        if not moved:
            r, c = (int(round(v)) for v in layer.world_to_data(event.position)[-2:])
            self.click_at(r, c)

    def click_at(self, row: int, col: int) -> str:
        """What a click at image pixel (row, col) does with the click tool on."""
        from ..segmentation import click_lesion

        op = self.layers.opened
        if op is None:
            return ""
        changes, what = click_lesion(op.annotation.record, op.rgb, self.code, (row, col))
        self.layers.show_changes(changes)
        self.layers.mark_edited()  # a rejection changes the table even where no pixel changed
        self.update_counts()
        self.layers.say(f"microaneurysm {what} at ({row}, {col})")
        return what

    # --- review ---------------------------------------------------------------------------------
    def _on_review(self, on: bool) -> None:
        self.reviewing = on
        self._enable_review_buttons()
        # application-wide while reviewing: the keys work whether the canvas or the dock has the focus
        # (a grader who just clicked Review has the focus on that button)
        for sc in self._shortcuts:
            sc.setEnabled(False)
            sc.deleteLater()
        self._shortcuts = []
        if on:
            for key, action in KEYS.items():
                sc = QShortcut(QKeySequence(key.upper()), self)
                sc.setContext(Qt.ShortcutContext.ApplicationShortcut)
                sc.activated.connect(getattr(self, action))
                self._shortcuts.append(sc)
        if on:
            self._skipped.clear()
            layer = self.layers.lesion_layer(self.code)
            if layer is not None:
                self.layers.want_lesion(self.code)
                self._contour_before = layer.contour
                layer.contour = max(layer.contour, REVIEW_CONTOUR)
            for other in (self.points_layer(), self._overlay_layer()):
                if other is not None and other.visible:
                    other.visible = False
                    self._hidden.append(other)
            if not self._show_next():
                show_info("no candidates to review: run Find microaneurysms first")
                self.review_button.setChecked(False)
        else:
            self.current = None
            layer = self.layers.lesion_layer(self.code)
            if layer is not None and self._contour_before is not None:
                layer.contour = self._contour_before  # filled again, as the grader had it
            self._contour_before = None
            for other in self._hidden:
                if other in self.layers.viewer.layers:
                    other.visible = True
            self._hidden = []
        self.update_counts()

    def _show_next(self) -> bool:
        """Zoom in on the most probable pending candidate not skipped yet; False when none is left."""
        from ..segmentation import review_queue

        rec = self.record()
        if rec is None:
            return False
        queue = [i for i in review_queue(rec, self.code) if i not in self._skipped]
        if not queue:
            self._skipped.clear()  # every one was skipped once: go round again
            queue = review_queue(rec, self.code)
        if not queue:
            self.current = None
            return False
        self.current = queue[0]
        p = rec.proposals[self.current]
        r, c = p.description.get("centre", [(p.box[0] + p.box[1]) // 2, (p.box[2] + p.box[3]) // 2])
        viewer = self.layers.viewer
        viewer.camera.center = (float(r), float(c))
        viewer.camera.zoom = REVIEW_ZOOM
        return True

    def _decide(self, decision: str) -> None:
        rec = self.record()
        if not self.reviewing or rec is None or self.current not in rec.proposals:
            return
        change = rec.decide(self.current, decision)
        self.layers.show_changes([change] if change is not None else [])
        self.layers.mark_edited()
        if not self._show_next():
            self.review_button.setChecked(False)
            show_info("every candidate is reviewed")
        self.update_counts()

    def candidates_changed(self) -> None:
        """A run or the dock's Accept replaced the candidates: review moves on to one that still exists."""
        rec = self.record()
        if self.reviewing and (rec is None or self.current not in rec.proposals):
            if not self._show_next():
                self.review_button.setChecked(False)
        self.update_counts()

    def accept(self) -> None:
        self._decide("accepted")

    def reject(self) -> None:
        self._decide("rejected")

    def next(self) -> None:
        if not self.reviewing or self.current is None:
            return
        self._skipped.add(self.current)
        self._show_next()
        self.update_counts()
