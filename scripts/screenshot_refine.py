"""Make docs/refine.png from a real napari window: coarse ellipses refined into lesion masks.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_refine.py

The IDRiD sample image is opened on its own (a copy in a temporary folder, so that its
ground-truth masks stay out of the picture); ellipses simulated from its HE and EX masks
around one region are drawn on the ellipse layer, and the shipped model refines them.
"""

import shutil
import sys
import tempfile
import time
from pathlib import Path

import napari
import numpy as np
from qtpy.QtWidgets import QApplication

from napari_retina.coarse import simulate_coarse_ellipses
from napari_retina.io.ellipses import ellipse_to_corners
from napari_retina.io.masks import read_mask
from napari_retina.sample_data import idrid_sample_masks
from napari_retina.widgets.annotator import LesionAnnotator

ROOT = Path(__file__).resolve().parents[1]
out = Path(sys.argv[1] if len(sys.argv) > 1 else ROOT / "docs" / "refine.png")
tmp = Path(tempfile.mkdtemp())
image = tmp / "IDRiD_22.jpg"
shutil.copy(ROOT / "napari_retina" / "samples" / "IDRiD_22.jpg", image)

viewer = napari.Viewer(title="napari-retina: ellipse refinement")
viewer.window._qt_window.resize(1500, 950)
widget = LesionAnnotator(viewer)
viewer.window.add_dock_widget(widget, name="Lesion annotator")
widget.open_path(image)
app = QApplication.instance()


def wait(cond, seconds=60):
    end = time.monotonic() + seconds
    while not cond():
        app.processEvents()
        time.sleep(0.01)
        if time.monotonic() > end:
            raise SystemExit(f"timed out after {seconds} s")


wait(lambda: widget.ellipses_layer is not None)  # the model loads at the first ellipse
centre, half = np.array([1450.0, 2150.0]), 420.0  # (row, col) of a region rich in exudates
drawn = 0
for code, path in idrid_sample_masks().items():
    if code not in ("HE", "EX"):
        continue
    for e in simulate_coarse_ellipses(read_mask(path), code, seed=0):
        x, y = e.center_xy
        if abs(y - centre[0]) < half and abs(x - centre[1]) < half * 1.5:
            widget.set_lesion(code, activate=False)
            widget.ellipses_layer.add(ellipse_to_corners(e), shape_type="ellipse")
            drawn += 1
wait(lambda: len(widget.refinement.results) >= drawn, 120)
widget.set_lesion("HE")
viewer.layers.selection.active = widget.ellipses_layer
viewer.camera.center = tuple(centre)
viewer.camera.zoom = 0.85
for _ in range(50):
    app.processEvents()
    time.sleep(0.02)
img = viewer.screenshot(canvas_only=False, flash=False)
from PIL import Image  # noqa: E402

Image.fromarray(np.asarray(img)).convert("RGB").save(out)
print(f"wrote {out} {img.shape}: {drawn} ellipses refined")
widget.flush()
widget._timer.stop()
viewer.close()
