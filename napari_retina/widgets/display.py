"""Display aids of the annotator dock: colour, green channel or CLAHE, and the field of view.

The field of view is computed in a worker once per image (`image_opened`); `fov_ready` then
carries it to whoever needs it (the lesion counts, the check that the image is a fundus
photograph), and the "field of view" box outlines it as a layer. Only the shown image changes:
the models and the saved project always see the photograph's own colours.
"""

from __future__ import annotations

import numpy as np
from napari.qt.threading import thread_worker
from napari.utils.notifications import show_error
from qtpy.QtCore import Signal
from qtpy.QtWidgets import QCheckBox, QComboBox, QGroupBox, QVBoxLayout

from ..fundus import enhance_display_contrast, field_of_view_mask, green_channel
from ..session import META_KEY
from .lesion_layers import LesionLayers, layer_role

DISPLAY_MODES = ("colour", "green channel", "contrast-enhanced (CLAHE)")
FOV_LAYER = "field of view"


class ImageDisplay(QGroupBox):
    """How the open image is shown; computes its field of view."""

    fov_ready = Signal(object)  # (rgb, bool mask) of the image it was computed for

    def __init__(self, layers: LesionLayers):
        super().__init__("Display")
        self.layers = layers
        lay = QVBoxLayout(self)  # stacked: side by side they were the dock's widest row
        self.display_combo = QComboBox()
        self.display_combo.addItems(DISPLAY_MODES)
        self.display_combo.currentIndexChanged.connect(self._on_display_changed)
        self.fov_check = QCheckBox("field of view")
        self.fov_check.toggled.connect(self.show_fov)
        lay.addWidget(self.display_combo)
        lay.addWidget(self.fov_check)

    def image_opened(self) -> None:
        """Another image is open: shown in colour, its field of view computed in the background."""
        self.display_combo.blockSignals(True)
        self.display_combo.setCurrentIndex(0)
        self.display_combo.blockSignals(False)
        self.layers.fov = None
        op = self.layers.opened
        if op is None:
            return
        rgb = op.rgb

        @thread_worker(ignore_errors=True)  # _fov_failed reports it, once
        def compute():
            return rgb, field_of_view_mask(rgb)

        # bound methods, not lambdas: Qt drops the connection if the dock is gone when the worker ends
        worker = compute()
        worker.returned.connect(self._set_fov)
        worker.errored.connect(self._fov_failed)
        worker.start()

    def _fov_failed(self, exc) -> None:
        show_error(f"field of view: {exc}")

    def _set_fov(self, result) -> None:
        rgb, fov = result
        op = self.layers.opened
        if op is None or op.rgb is not rgb:
            return  # the grader already moved on
        self.layers.fov = fov
        self.show_fov(self.fov_check.isChecked())
        self.fov_ready.emit(result)

    def show_fov(self, on: bool) -> None:
        viewer = self.layers.viewer
        for layer in [layer for layer in viewer.layers if layer_role(layer) == "fov"]:
            viewer.layers.remove(layer)
        fov = self.layers.fov
        if on and fov is not None:
            layer = viewer.add_labels(fov.astype(np.uint8), name=FOV_LAYER, opacity=0.8,
                                      metadata={META_KEY: {"role": "fov"}})
            layer.contour = 6
            layer.editable = False
            viewer.layers.move(viewer.layers.index(layer), 1)

    def _on_display_changed(self, index: int) -> None:
        op, layer = self.layers.opened, self.layers.image_layer
        if op is None or layer is None:
            return
        mode = DISPLAY_MODES[index]
        if mode == "colour":
            layer.data = op.rgb
            return
        rgb = op.rgb

        @thread_worker(ignore_errors=True)  # _display_failed reports it, once
        def compute():
            if mode == "green channel":
                g = green_channel(rgb)
                return rgb, np.repeat(g[..., None], 3, axis=2)
            return rgb, enhance_display_contrast(rgb)

        worker = compute()
        worker.returned.connect(self._show_view)
        worker.errored.connect(self._display_failed)
        worker.start()

    def _display_failed(self, exc) -> None:
        show_error(f"display: {exc}")

    def _show_view(self, result) -> None:
        rgb, data = result
        op, layer = self.layers.opened, self.layers.image_layer
        if layer is not None and op is not None and op.rgb is rgb:
            layer.data = data
