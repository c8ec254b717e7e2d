""""Find exudates" in the annotator: a whole-image segmenter as an overlay and as proposals.

The segmenter runs in a worker thread, tile by tile, with napari's progress bar and a
cancel button; the GUI never waits. Its map becomes (1) a probability overlay (an Image
layer, role "probability") that fills as tiles finish (redrawn at most every
`PREVIEW_EVERY_S`) and (2) block proposals in the
lesion's pixel record (`segmentation.RunProposals`), each 512-px block proposed as soon as
no tile still to run can change it, so candidates appear while the model runs. The
threshold slider moves them live, the dock's one Accept for the class keeps them as the grader's
pixels, the grader erases what is wrong with napari's eraser, and the project folder saves and
restores all of it. Cancel (or opening another image) withdraws what the run proposed and puts back what it
replaced. This class forwards and paints; the pixel logic lives in the headless core.
"""

from __future__ import annotations

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Qt, Signal
from qtpy.QtWidgets import QGridLayout, QGroupBox, QLabel, QMessageBox, QPushButton, QSlider

from ..lesions import lesion as lesion_info
from ..segmentation import SEGMENTER_KINDS
from .activity import SlowAnimations, move_bar
from .lesion_layers import LesionLayers

ROLE = "probability"
# the overlay follows the map at most this often while the model runs: each update uploads the
# whole overlay to the graphics card on the GUI thread (150-250 ms under Xvfb's software GL)
PREVIEW_EVERY_S = 0.5
# the progress bar and status line follow the tiles at most this often: with a software OpenGL
# (no graphics card, remote desktops) every repaint of the window recomposes the canvas, about
# 0.2 CPU-s each, which the model would otherwise lose on every tile
PROGRESS_EVERY_S = 0.25


def _overlay_map(prob_u8: np.ndarray, scale: float) -> np.ndarray:
    """The overlay of a full-size uint8 map: at the model's working scale (a quarter of the memory at 0.5)."""
    if scale == 1.0:
        return prob_u8
    import cv2

    from ..models.segmenter import scaled_size

    return cv2.resize(prob_u8, scaled_size(prob_u8.shape, scale), interpolation=cv2.INTER_AREA)


class _Progress(QObject):
    # emitted from the worker, delivered on the GUI thread in the order emitted
    tile = Signal(int, int)  # done, total
    started = Signal(object)  # (rgb, segmenter): the model is loaded
    preview = Signal(object)  # (rgb, uint8 map at the working scale, filled so far)
    block = Signal(object)  # (rgb, box, float32 probabilities): a final block of the full-size map


class LesionFinder(QGroupBox):
    """One lesion's segmenter in the dock: find, cancel, threshold (the dock's Accept keeps the proposals).

    It runs the session's version in use of its model kind (`session.model_dir`); when another
    version is put in use, `model_changed` drops the loaded model and the next Find loads it."""

    finished = Signal(str)  # lesion code, when the proposals are in the layer
    changed = Signal(str)  # lesion code, whenever the model's proposals changed (a run, the dock's Accept)

    def __init__(self, layers: LesionLayers, code: str = "EX"):
        super().__init__(f"Find {SEGMENTER_KINDS[code]}")
        self.layers = layers
        self.code = code
        self.segmenter = None
        self.threshold: float | None = None
        self._worker = None
        self._cancel = False
        self._pbar = None
        self._signals = _Progress()
        self._signals.tile.connect(self._on_tile)
        self._signals.started.connect(self._on_started)
        self._signals.preview.connect(self._on_preview)
        self._signals.block.connect(self._on_block)
        self._scale = 1.0
        self._run = None  # segmentation.RunProposals of the run in progress
        self._run_rgb = None  # the image the run in progress belongs to
        self._last_tile_shown = 0.0  # time.monotonic() of the last progress shown
        self._slowed = None  # activity.SlowAnimations held while a run goes on
        self._generation = 0  # +1 whenever another model version is selected
        self._run_generation = 0

        lay = QGridLayout(self)
        self.find_button = QPushButton(f"Find {SEGMENTER_KINDS[code]}")
        self.find_button.setToolTip("segment the whole image; the candidates become proposals in the "
                                    f"{lesion_info(code).layer_name} layer")
        self.find_button.clicked.connect(self.find)
        self.cancel_button = QPushButton("Cancel")
        self.cancel_button.setEnabled(False)
        self.cancel_button.clicked.connect(self.cancel)
        self.threshold_slider = QSlider(Qt.Orientation.Horizontal)
        self.threshold_slider.setRange(5, 95)
        self.threshold_slider.setValue(50)
        # until a run (or the grader) sets it, the model's own threshold applies: say so, not a number
        self.threshold_label = QLabel("threshold: model's")
        self.threshold_label.setToolTip("the model's own threshold until you move the slider")
        self.threshold_slider.valueChanged.connect(self._on_threshold)
        self.status = QLabel("")
        self.status.setWordWrap(True)
        lay.addWidget(self.find_button, 0, 0)
        lay.addWidget(self.cancel_button, 0, 1)
        lay.addWidget(self.threshold_label, 1, 0)
        lay.addWidget(self.threshold_slider, 1, 1)
        lay.addWidget(self.status, 2, 0, 1, 2)

    # --- running -------------------------------------------------------------------------------
    @property
    def running(self) -> bool:
        return self._worker is not None

    def find(self) -> None:
        op = self.layers.opened
        if op is None:
            show_info("open a fundus image first")
            return
        if self.running:
            return
        if op.fundus is None:  # Find before the field of view came back: 0.03-0.08 s on 12 megapixels
            from ..fundus import field_of_view_mask
            from ..session import looks_like_fundus

            op.fundus = looks_like_fundus(field_of_view_mask(op.rgb))
        if not self.layers.session.fundus_confirmed(op):
            if not confirm_not_fundus(self, op.record.image.name):
                self.status.setText("not run: the image does not look like a fundus photograph")
                return
            self.layers.session.confirm_fundus(op)
        rgb, fov = op.rgb, self.layers.fov
        code = self.code
        segmenter = self.segmenter
        model_dir = self.layers.session.model_dir(SEGMENTER_KINDS[code]) if segmenter is None else None
        self._run_generation = self._generation
        self._cancel = False
        signals = self._signals

        from .. import segmentation
        from ..metrics import label_lesions

        self._run = None
        self._block = block = segmentation.BLOCK  # one block size for the worker and the record
        threshold = self.threshold  # None: the model's own

        @thread_worker(ignore_errors=True)  # errors (and a cancel) are reported by _failed, not re-raised
        def run():
            import os

            import torch

            from ..segmentation import load_segmenter

            seg = segmenter or load_segmenter(code, model_dir)
            signals.started.emit((rgb, seg))  # first the model (scale, threshold), then the maps
            blocks = getattr(seg, "proposes", "blocks") == "blocks"  # candidates are proposed whole at the end
            # every core while it runs (the ellipse refiner keeps torch to half of them for its
            # short calls): the window stays fluid, and Find microaneurysms takes 15-17 s instead
            # of 19.5 on 2 cores (benchmarks/find_responsiveness.py)
            threads = torch.get_num_threads()
            torch.set_num_threads(os.cpu_count() or threads)
            try:
                result = seg.segment(rgb, fov, progress=signals.tile.emit, cancelled=lambda: self._cancel,
                                     preview=lambda m: signals.preview.emit((rgb, m.copy())),
                                     on_block=(lambda box, sub: signals.block.emit((rgb, box, sub))) if blocks else None,
                                     block=block, preview_every=PREVIEW_EVERY_S)
            finally:
                torch.set_num_threads(threads)
            # what takes more than a few milliseconds over 12 megapixels is done here, not on the GUI thread
            overlay = _overlay_map(result.prob_uint8, seg.scale)
            components = None
            if not blocks:  # candidates: their connected regions at the floor the run started with
                floor = segmentation.candidate_floor(seg, threshold)
                components = (floor, *label_lesions(result.prob >= floor))
            return rgb, seg, result, overlay, components

        self._worker = run()
        self._run_rgb = rgb  # the image this run belongs to
        self._worker.returned.connect(self._done)
        self._worker.errored.connect(self._failed)
        self._worker.finished.connect(self._ended)
        overlay = self.overlay_layer()  # given back if the run is cancelled or fails
        self._overlay_before = None if overlay is None else (overlay.data, tuple(overlay.scale), tuple(overlay.translate))
        from napari.utils import progress

        # made here, before the worker can send a tile: napari processes pending events while it
        # makes a progress bar, so made on the first tile, the next tiles' signals made more bars
        self._pbar = progress(total=0, desc=f"finding {SEGMENTER_KINDS[self.code]}")  # 0: until the tiles are known
        self._slowed = SlowAnimations(self)
        self.find_button.setEnabled(False)
        self.cancel_button.setEnabled(True)
        self.status.setText("loading the model..." if segmenter is None else "segmenting...")
        self._worker.start()

    def _keep(self, seg) -> None:
        """Keep the loaded model for the next run, unless another version was selected meanwhile."""
        if self._run_generation == self._generation:
            self.segmenter = seg

    def model_changed(self) -> None:
        """Another model version is in use: the next run loads it, at that version's own threshold."""
        self._generation += 1
        self.segmenter = None
        if not self.running:
            self.threshold = None
            self.threshold_label.setText("threshold: model's")
        self.status.setText(f"the next Find runs version {self.layers.session.model_version(SEGMENTER_KINDS[self.code])}")

    def cancel(self) -> None:
        self._cancel = True  # checked between tiles: the run stops within one tile
        self.status.setText("cancelling...")

    def _roll_back(self) -> None:
        """Withdraw what the run proposed and put back what it replaced (its image is still open)."""
        run, self._run = self._run, None
        if run is not None:
            self.layers.show_changes(run.roll_back())

    def _current(self, rgb) -> bool:
        """Is `rgb` (a run's image) the image open now, and the run not cancelled?"""
        op = self.layers.opened
        return op is not None and op.rgb is rgb and not self._cancel

    def _on_tile(self, done: int, total: int) -> None:
        import time

        now = time.monotonic()
        if self._pbar is None or (done < total and now - self._last_tile_shown < PROGRESS_EVERY_S):
            return
        self._last_tile_shown = now
        self.status.setText(f"tile {done} of {total}")
        move_bar(self._pbar, done, total)  # last: it may run the run's end, whose status line stays

    def _on_started(self, payload) -> None:
        from ..segmentation import RunProposals

        rgb, seg = payload
        if not self._current(rgb):
            return  # another image is open now (its run is being cancelled)
        self._keep(seg)
        self._scale = seg.scale
        if self.threshold is None:
            self.set_threshold_value(seg.threshold)
        op = self.layers.opened
        self._run = RunProposals(op.annotation.record, self.code, self.threshold, {"kind": "model", **seg.description},
                                 block=self._block)
        self.status.setText("segmenting...")

    def _on_preview(self, payload) -> None:
        """The overlay fills while the model runs, at most every PREVIEW_EVERY_S (at the working scale, scaled up)."""
        rgb, data = payload
        if self._current(rgb):
            self._show_overlay(data, 1.0 / self._scale)

    def _on_block(self, payload) -> None:
        """A block of the map is final: its candidates go into the record at once."""
        rgb, box, sub = payload
        if self._run is not None and self._current(rgb):
            self.layers.show_changes(self._run.add(box, sub))

    def _restore_overlay(self) -> None:
        layer = self.overlay_layer()
        before = getattr(self, "_overlay_before", None)
        if layer is None:
            return
        if before is None:
            self.layers.viewer.layers.remove(layer)
        else:
            data, scale, translate = before
            layer.scale, layer.translate = scale, translate
            layer.data = data

    def _ended(self) -> None:
        self._worker = None
        if self._pbar is not None:
            self._pbar.close()
            self._pbar = None
        if self._slowed is not None:
            self._slowed.release()
            self._slowed = None
        self.find_button.setEnabled(True)
        self.cancel_button.setEnabled(False)

    def _failed(self, exc) -> None:
        from ..models.tiling import TilingCancelled

        op = self.layers.opened
        if op is not None and op.rgb is self._run_rgb:
            self._roll_back()
            self._restore_overlay()
        if isinstance(exc, TilingCancelled):
            self.status.setText("cancelled: nothing was changed")
            return
        msg = str(exc).splitlines()[0] if str(exc) else type(exc).__name__
        self.status.setText(msg)
        show_error(f"find {SEGMENTER_KINDS[self.code]}: {msg}")

    def _done(self, payload) -> None:
        from ..segmentation import RunProposals

        rgb, seg, result, overlay, components = payload
        self._keep(seg)
        op = self.layers.opened
        if op is None or op.rgb is not rgb:
            self.status.setText("the image changed while the model ran: run it again")
            return
        if self._cancel:  # cancelled after the last tile: as if it had stopped before
            self._roll_back()
            self._restore_overlay()
            self.status.setText("cancelled: nothing was changed")
            return
        if self.threshold is None:
            self.set_threshold_value(seg.threshold)
        self._show_overlay(overlay, 1.0 / seg.scale)
        op.annotation.provenance.setdefault("models", {})[seg.kind] = seg.description
        run, self._run = self._run, None
        desc = {"kind": "model", **seg.description}
        if getattr(seg, "proposes", "blocks") == "candidates":
            from ..segmentation import candidate_floor, propose_candidates

            changes, n = propose_candidates(op.annotation.record, self.code, result.prob, self.threshold, desc,
                                            floor=candidate_floor(seg, self.threshold), components=components)
            self.layers.show_changes(changes)
            self.layers.mark_edited()
            self.status.setText(f"{n} candidates ({result.seconds:.1f} s); review them, or accept them all")
            self.changed.emit(self.code)
            self.finished.emit(self.code)
            return
        if run is None:
            run = RunProposals(op.annotation.record, self.code, self.threshold, desc, block=self._block)
        self.layers.show_changes(run.finish(result.prob))  # the blocks not proposed yet
        n = len(self.proposals())
        self.status.setText(f"{n} blocks with candidates ({result.seconds:.1f} s); erase what is wrong, then accept")
        self.changed.emit(self.code)
        self.finished.emit(self.code)

    # --- the overlay and the proposals ------------------------------------------------------------------
    def overlay_layer(self):
        for layer in self.layers.viewer.layers:
            meta = layer.metadata.get("napari_retina", {})
            if meta.get("role") == ROLE and meta.get("lesion") == self.code:
                return layer
        return None

    def _show_overlay(self, prob_u8: np.ndarray, scale: float = 1.0) -> None:
        layer = self.overlay_layer()
        # pixel (r, c) of a map at 1/s covers full-resolution pixels s r .. s (r + 1): its centre
        # is at s r + (s - 1) / 2, so the overlay lines up with the image
        shift = (scale - 1.0) / 2.0
        if layer is not None:
            layer.scale, layer.translate = (scale, scale), (shift, shift)
            layer.data = prob_u8
            return
        viewer = self.layers.viewer
        active = viewer.layers.selection.active  # napari selects a new layer: the grader's stays selected
        viewer.add_image(
            prob_u8, name=f"{self.code} probability", colormap="magma", contrast_limits=(0, 255),
            scale=(scale, scale), translate=(shift, shift),
            opacity=0.5, blending="additive", visible=True,
            interpolation2d="linear",  # a map at a quarter or half scale, zoomed in, shows no blocks
            metadata={"napari_retina": {"role": ROLE, "lesion": self.code}},
        )
        lesion_layer = self.layers.lesion_layer(self.code)
        if lesion_layer is not None:  # the mask stays on top of the overlay
            viewer.layers.move(viewer.layers.index(lesion_layer), len(viewer.layers))
        if active is not None and active in viewer.layers:  # e.g. the eraser works on the lesion layer at once
            viewer.layers.selection.active = active

    def proposals(self):
        op = self.layers.opened
        if op is None:
            return []
        model = SEGMENTER_KINDS[self.code]
        return [p for p in op.annotation.record.find(model=model) if p.lesion == self.code]

    def set_threshold_value(self, t: float) -> None:
        """The model's own threshold, exactly (the slider shows it to 0.01 until the grader moves it)."""
        self.threshold_slider.blockSignals(True)
        self.threshold_slider.setValue(int(round(t * 100)))
        self.threshold_slider.blockSignals(False)
        self.threshold = float(t)
        self.threshold_label.setText(f"threshold {self.threshold:.2f}")

    def show_restored(self) -> None:
        """An image opened with candidates already in its project: the slider shows their threshold."""
        props = self.proposals()
        if props:
            self.set_threshold_value(props[0].threshold)
            if all(p.description.get("candidate") for p in props):
                self.status.setText(f"{len(props)} candidates from the project; review them, or accept them all")
            else:
                self.status.setText(f"{len(props)} blocks with candidates from the project; erase what is wrong, then accept")
        else:
            self.status.setText("")

    def image_changed(self) -> None:
        """Another image is about to open: a run on this one stops, and what it proposed goes
        now, before this image is saved (its results would not apply)."""
        if self.running:
            self.cancel()
            self._roll_back()

    def _on_threshold(self, value: int) -> None:
        self.threshold = value / 100
        self.threshold_label.setText(f"threshold {self.threshold:.2f}")
        if self._run is not None:
            self._run.threshold = self.threshold  # blocks still to come use it too
        op = self.layers.opened
        if op is not None:
            ids = [p.id for p in self.proposals()]
            if ids:
                self.layers.show_changes(op.annotation.record.set_threshold(self.threshold, ids=ids))


def confirm_not_fundus(parent, name: str) -> bool:
    """Ask once per image whether to propose lesions on an image that does not look like a fundus photograph."""
    answer = QMessageBox.question(
        parent, "Not a fundus photograph?",
        f"{name} has no circular field of view: it does not look like a colour fundus photograph.\n"
        "The lesion models were trained on fundus photographs. Propose lesions anyway?",
    )
    return answer == QMessageBox.StandardButton.Yes
