"""Ellipse -> pixel mask in the annotator: refine in a worker, write into the lesion's layer.

Each refined ellipse is one contributor in the project's source maps, so
deleting or moving an ellipse removes exactly what it added and never a pixel
the grader painted by hand, also after the project was closed and reopened.
"""

from __future__ import annotations

import time
from pathlib import Path
from typing import TYPE_CHECKING

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error, show_info
from qtpy.QtCore import QObject, Signal

from ..io.ellipses import Ellipse
from ..io.project import SOURCE_HAND, SOURCE_NONE
from ..lesions import lesion

if TYPE_CHECKING:
    from .annotator import LesionAnnotator


def _key(e: Ellipse) -> tuple:
    return (e.lesion, *np.round(e.center_xy, 3), *np.round(e.semi_axes, 3), round(e.angle_deg, 3))


class EllipseRefinement(QObject):
    """Keeps the lesion layers in step with the ellipses of the annotator's Shapes layer."""

    refined = Signal(str, float)  # ellipse id, seconds from request to pixels shown
    model_ready = Signal(object)

    def __init__(self, annotator: "LesionAnnotator", model_dir=None):
        super().__init__(annotator)
        self.ann_widget = annotator
        self.model_dir = Path(model_dir) if model_dir is not None else None
        self.refiner = None
        self.model_error: str | None = None
        self.enabled = True
        self.superpixels: bool | None = None  # None: the model's own setting
        self.threshold: float | None = None  # None: the model's own threshold
        self.results: dict[str, object] = {}  # ellipse id -> RefinedEllipse (probabilities kept for the slider)
        self.known: dict[str, tuple] = {}  # ellipse id -> geometry last refined (or restored)
        self._queue: dict[str, tuple[Ellipse, float]] = {}
        self._busy = False
        self._loading = False

    # --- model -----------------------------------------------------------------------------
    def load_model(self) -> None:
        if self.refiner is not None or self._loading or self.model_error:
            return
        from ..models.folder import CONFIG, WEIGHTS
        from ..models.refiner import default_model_dir

        model_dir = self.model_dir or default_model_dir()
        if not ((model_dir / WEIGHTS).is_file() and (model_dir / CONFIG).is_file()):
            self.model_error = f"no refinement model in {model_dir}"
            self.ann_widget.model_label.setText("no refinement model: ellipses are kept as drawn")
            return
        self._loading = True

        @thread_worker
        def load():
            from ..models.refiner import EllipseRefiner

            refiner = EllipseRefiner(model_dir)
            refiner.warm_up()  # trace here, not when the grader draws the first ellipse
            return refiner

        worker = load()
        worker.returned.connect(self._model_loaded)
        worker.errored.connect(self._model_failed)
        worker.start()

    def _model_loaded(self, refiner) -> None:
        self._loading = False
        self.refiner = refiner
        if self.threshold is None:
            self.threshold = refiner.threshold
        self.model_ready.emit(refiner)
        self._kick()

    def _model_failed(self, exc) -> None:
        self._loading = False
        self.model_error = str(exc)
        show_error(f"ellipse refinement unavailable: {exc}")

    # --- reacting to the Shapes layer ------------------------------------------------------------
    def reset(self, current: dict[str, Ellipse]) -> None:
        """A new image: its existing ellipses count as refined (their pixels are in the masks)."""
        self.results.clear()
        self._queue.clear()
        self.known = {eid: _key(e) for eid, e in current.items()}

    def sync(self, current: dict[str, Ellipse]) -> None:
        """Remove contributions of deleted/moved ellipses and queue new/moved ones."""
        for eid in list(self.known):
            if eid not in current or self.known[eid] != _key(current[eid]):
                self.remove(eid)
        if not self.enabled:
            return
        for eid, e in current.items():
            if eid not in self.known:
                self.request(eid, e)

    def request(self, eid: str, e: Ellipse) -> None:
        self.known[eid] = _key(e)
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
        if self._busy or not self._queue or self.refiner is None or self.ann_widget.opened is None:
            return
        batch = dict(self._queue)
        self._queue.clear()
        self._busy = True
        rgb = self.ann_widget.opened.rgb
        refiner, sp = self.refiner, self.superpixels

        @thread_worker
        def run():
            ids = list(batch)
            results = refiner.refine_each(rgb, [batch[i][0] for i in ids], superpixels=sp)
            return rgb, {i: (r, batch[i][1]) for i, r in zip(ids, results)}

        worker = run()
        worker.returned.connect(self._apply_batch)
        worker.errored.connect(self._failed)
        worker.start()

    def _failed(self, exc) -> None:
        self._busy = False
        show_error(f"ellipse refinement failed: {exc}")

    def _apply_batch(self, payload) -> None:
        self._busy = False
        rgb, results = payload
        op = self.ann_widget.opened
        if op is not None and op.rgb is rgb:
            for eid, (res, t0) in results.items():
                # the ellipse may have moved or gone while the worker ran
                if eid in self.known and self.known[eid] == _key(res.ellipse) and eid not in self._queue:
                    self.results[eid] = res
                    self._paint(eid, res)
                    self.refined.emit(eid, time.perf_counter() - t0)
        self._kick()

    # --- pixels ----------------------------------------------------------------------------
    def _source_id(self, eid: str, e: Ellipse) -> int:
        ann = self.ann_widget.opened.annotation
        for sid, desc in ann.source_table.items():
            if desc.get("ellipse_id") == eid:
                return sid
        desc = {"kind": "model", "model": "refiner", "ellipse_id": eid, "lesion": e.lesion}
        if self.refiner is not None:
            desc["version"] = self.refiner.version
        return ann.add_source(desc)

    def _paint(self, eid: str, res) -> None:
        e = res.ellipse
        layer = self.ann_widget.lesion_layer(e.lesion)
        if layer is None:
            return
        ann = self.ann_widget.opened.annotation
        sid = self._source_id(eid, e)
        r0, r1, c0, c1 = res.box
        if r1 <= r0 or c1 <= c0:
            return
        data = layer.data
        src = self._source_map(e.lesion, layer)
        region, sreg = data[r0:r1, c0:c1], src[r0:r1, c0:c1]
        new = res.mask(self.threshold) & (sreg == SOURCE_NONE) & (region == 0)
        region[new] = lesion(e.lesion).label
        sreg[new] = sid
        layer.refresh()
        ann.provenance.setdefault("models", {})["refiner"] = self.refiner.description if self.refiner else {}

    def _source_map(self, code: str, layer) -> np.ndarray:
        """The lesion's contributor map, made from the layer on first use (all present = hand)."""
        ann = self.ann_widget.opened.annotation
        if code not in ann.sources:
            m = np.zeros(layer.data.shape, np.uint16)
            m[np.asarray(layer.data) != 0] = SOURCE_HAND
            ann.sources[code] = m
        return ann.sources[code]

    def remove(self, eid: str) -> int:
        """Take away what ellipse `eid` added; hand-painted pixels stay. Returns pixels removed."""
        self.known.pop(eid, None)
        self._queue.pop(eid, None)
        res = self.results.pop(eid, None)
        op = self.ann_widget.opened
        if op is None:
            return 0
        ann = op.annotation
        sids = [sid for sid, d in ann.source_table.items() if d.get("ellipse_id") == eid]
        removed = 0
        for sid in sids:
            code = ann.source_table[sid].get("lesion") or (res.ellipse.lesion if res else None)
            codes = [code] if code else list(ann.sources)
            for c in codes:
                if c not in ann.sources:
                    continue
                layer = self.ann_widget.lesion_layer(c)
                src = ann.sources[c]
                gone = src == sid
                n = int(gone.sum())
                if n and layer is not None:
                    layer.data[gone] = 0
                    src[gone] = SOURCE_NONE
                    self._refill(c, gone)
                    layer.refresh()
                removed += n
            del ann.source_table[sid]
        return removed

    def _refill(self, code: str, freed: np.ndarray) -> None:
        """Pixels another ellipse also proposed come back after one of two overlapping ellipses goes."""
        for eid, res in self.results.items():
            if res.ellipse.lesion != code:
                continue
            r0, r1, c0, c1 = res.box
            if freed[r0:r1, c0:c1].any():
                self._paint(eid, res)

    def accept(self, code: str) -> int:
        """The grader accepts the model's pixels of a lesion: they become hand pixels.

        A brush stroke only claims the pixels it changes (napari skips pixels that
        already hold the label), so accepting is how proposals are kept for good.
        """
        op = self.ann_widget.opened
        if op is None or code not in op.annotation.sources:
            return 0
        ann = op.annotation
        src = ann.sources[code]
        model = src > SOURCE_HAND
        n = int(model.sum())
        src[model] = SOURCE_HAND
        for sid, d in list(ann.source_table.items()):
            if d.get("lesion") == code and d.get("kind") == "model":
                del ann.source_table[sid]
                self.results.pop(d.get("ellipse_id"), None)
        self.ann_widget.mark_sources_changed(code)
        return n

    def set_threshold(self, t: float) -> None:
        """Live preview: re-threshold every ellipse refined in this session."""
        self.threshold = t
        for eid, res in list(self.results.items()):
            keep = res
            self.remove(eid)
            self.known[eid] = _key(keep.ellipse)
            self.results[eid] = keep
            self._paint(eid, keep)

    def info(self) -> str:
        if self.model_error:
            return "refinement unavailable"
        if self.refiner is None:
            return "loading the refinement model..."
        return f"refiner {self.refiner.version}"


def notify_model(refiner) -> None:
    show_info(f"ellipse refinement ready (model {refiner.version})")
