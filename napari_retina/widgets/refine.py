"""Ellipse -> pixel mask in the annotator: refine in a worker, propose the pixels, paint the boxes.

Each refined ellipse becomes one proposal of the image's `PixelRecord`
(napari_retina.proposals), described by its ellipse id: deleting, moving or
re-thresholding the ellipse withdraws or re-derives exactly that proposal, never a
pixel the grader painted, also after the project was closed and reopened. This
class only forwards the Shapes layer's changes and paints the boxes the record
returns; it holds no pixel logic of its own.
"""

from __future__ import annotations

import time
import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import QObject, Signal

from ..io.ellipses import Ellipse
from .lesion_layers import LesionLayers

REFINER = "refiner"  # the `model` of the proposals this class makes


def ellipse_key(e: Ellipse) -> tuple:
    """What identifies an ellipse's geometry and lesion (rounded): a refinement is redone when it changes."""
    return (e.lesion, *np.round(e.center_xy, 3), *np.round(e.semi_axes, 3), round(e.angle_deg, 3))


class EllipseRefinement(QObject):
    """Keeps the lesion layers in step with the ellipses of the session's Shapes layer.

    The model is the session's refiner version in use (`session.model_dir("refiner")`); when
    another version is put in use, `model_changed` drops the loaded one and the next ellipse is
    refined by the new one."""

    refined = Signal(str, float)  # ellipse id, seconds from request to pixels shown
    model_ready = Signal(object)
    model_status = Signal(str)  # one line on the model for the dock

    def __init__(self, layers: LesionLayers, parent: QObject | None = None):
        super().__init__(parent)
        self.layers = layers
        self.refiner = None
        self.model_error: str | None = None
        self.enabled = True
        self.superpixels: bool | None = None  # None: the model's own setting
        self.threshold: float | None = None  # None: the model's own threshold
        self.known: dict[str, tuple] = {}  # ellipse id -> geometry last refined (or restored)
        self._queue: dict[str, tuple[Ellipse, float]] = {}
        self._busy = False
        self._loading = False
        self._reload = False

    # --- model -----------------------------------------------------------------------------
    def load_model(self) -> None:
        if self._loading:
            self._reload = True  # another version was chosen meanwhile: load that one once this ends
            return
        if self.refiner is not None or self.model_error:
            return
        from ..models.folder import CONFIG, WEIGHTS

        model_dir = self.layers.session.model_dir(REFINER)
        if not ((model_dir / WEIGHTS).is_file() and (model_dir / CONFIG).is_file()):
            self.model_error = f"no refinement model in {model_dir}"
            self.model_status.emit("no refinement model: ellipses are kept as drawn")
            return
        self._loading = True
        self.model_status.emit("loading the refinement model...")

        @thread_worker(ignore_errors=True)  # _model_failed reports it, once
        def load():
            import os

            import torch

            from ..models.refiner import EllipseRefiner

            # half the cores: napari's drawing needs the rest, and OpenMP threads that wait for a
            # core the GUI holds make each ellipse slower, not faster (2 cores: 62 vs 83 ms median)
            torch.set_num_threads(max(1, (os.cpu_count() or 2) // 2))
            refiner = EllipseRefiner(model_dir)
            refiner.warm_up()  # trace here, not when the grader draws the first ellipse
            return refiner

        worker = load()
        worker.returned.connect(self._model_loaded)
        worker.errored.connect(self._model_failed)
        worker.start()

    def _model_loaded(self, refiner) -> None:
        self._loading = False
        if self._reload:
            self._reload = False
            self.load_model()
            return
        self.refiner = refiner
        if self.threshold is None:
            self.threshold = refiner.threshold
        self.model_ready.emit(refiner)
        self._kick()

    def model_changed(self) -> None:
        """Another refiner version is in use: the next ellipse is refined by it (loaded now), at
        that version's own threshold."""
        self.refiner, self.model_error, self.threshold = None, None, None
        self.load_model()

    def _model_failed(self, exc) -> None:
        self._loading = False
        if self._reload:
            self._reload = False
            self.load_model()
            return
        self.model_error = str(exc)
        self.model_status.emit("refinement unavailable: ellipses are kept as drawn")
        show_error(f"ellipse refinement unavailable: {exc}")

    @property
    def busy(self) -> bool:
        """A refinement is running or waiting (the autosave lets it have the CPU)."""
        return self._busy or bool(self._queue)

    # --- reacting to the Shapes layer ------------------------------------------------------------
    def reset(self, current: dict[str, Ellipse]) -> None:
        """A new image: its existing ellipses count as refined (their pixels are in the masks)."""
        self._queue.clear()
        self.known = {eid: ellipse_key(e) for eid, e in current.items()}

    def sync(self, current: dict[str, Ellipse]) -> None:
        """Withdraw the proposals of deleted/moved ellipses and queue new/moved ones."""
        for eid in list(self.known):
            if eid not in current or self.known[eid] != ellipse_key(current[eid]):
                self.remove(eid)
        if not self.enabled:
            return
        for eid, e in current.items():
            if eid not in self.known:
                self.request(eid, e)

    def request(self, eid: str, e: Ellipse) -> None:
        self.known[eid] = ellipse_key(e)
        self._queue[eid] = (e, time.perf_counter())
        if self.refiner is None:
            self.load_model()
        else:
            self._kick()

    def refine_all(self, current: dict[str, Ellipse]) -> None:
        """Refine every ellipse again (e.g. ellipses loaded from a file, or a new model)."""
        for eid in list(self.known):
            self.remove(eid)
        for eid, e in current.items():
            self.request(eid, e)

    def _kick(self) -> None:
        if self._busy or not self._queue or self.refiner is None or self.layers.opened is None:
            return
        batch = dict(self._queue)
        self._queue.clear()
        self._busy = True
        rgb = self.layers.opened.rgb
        refiner, sp = self.refiner, self.superpixels

        @thread_worker(ignore_errors=True)  # _failed reports it, once
        def run():
            ids = list(batch)
            results = refiner.refine_each(rgb, [batch[i][0] for i in ids], superpixels=sp)
            return rgb, refiner, {i: (r, batch[i][1]) for i, r in zip(ids, results)}

        worker = run()
        worker.returned.connect(self._apply_batch)
        worker.errored.connect(self._failed)
        worker.start()

    def _failed(self, exc) -> None:
        self._busy = False
        show_error(f"ellipse refinement failed: {exc}")
        self._kick()

    def _apply_batch(self, payload) -> None:
        self._busy = False
        rgb, refiner, results = payload
        op = self.layers.opened
        if refiner is not self.refiner:  # another version was put in use while this ran: refine again
            for eid, (res, _) in results.items():
                if eid in self.known and self.known[eid] == ellipse_key(res.ellipse) and eid not in self._queue:
                    self._queue[eid] = (res.ellipse, time.perf_counter())
            results = {}
        if op is not None and op.rgb is rgb:
            for eid, (res, t0) in results.items():
                # the ellipse may have moved or gone while the worker ran
                if eid in self.known and self.known[eid] == ellipse_key(res.ellipse) and eid not in self._queue:
                    self._propose(eid, res, refiner)
                    self.refined.emit(eid, time.perf_counter() - t0)
        self._kick()

    # --- forwarding to the pixel record ------------------------------------------------------------
    def _propose(self, eid: str, res, refiner) -> None:
        op = self.layers.opened
        record = op.annotation.record
        # provenance names the version that made these pixels
        desc = {"kind": "model", "model": REFINER, "ellipse_id": eid, "version": refiner.version}
        op.annotation.provenance.setdefault("models", {})[REFINER] = refiner.description
        changes = record.withdraw_where(model=REFINER, ellipse_id=eid)  # a stale result of the same ellipse
        _, change = record.propose(res.ellipse.lesion, res.box, prob=res.prob, threshold=self.threshold, description=desc)
        self.layers.show_changes([*changes, change])

    def remove(self, eid: str) -> None:
        """Take away what ellipse `eid` proposed; hand-painted pixels and other proposals' stay."""
        self.known.pop(eid, None)
        self._queue.pop(eid, None)
        op = self.layers.opened
        if op is not None:
            self.layers.show_changes(op.annotation.record.withdraw_where(model=REFINER, ellipse_id=eid))

    def set_threshold(self, t: float) -> None:
        """Live preview: re-threshold every refined ellipse (restored ones included)."""
        self.threshold = t
        op = self.layers.opened
        if op is not None:
            self.layers.show_changes(op.annotation.record.set_threshold(t, model=REFINER))
