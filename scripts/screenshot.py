"""Make docs/screenshot.png from a real napari window: the IDRiD sample with the annotator docked.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot.py
"""

import sys
import tempfile
from pathlib import Path

import napari
import numpy as np
from qtpy.QtCore import QTimer

import napari_retina._npe2 as npe2_entry

out = Path(sys.argv[1] if len(sys.argv) > 1 else Path(__file__).resolve().parents[1] / "docs" / "screenshot.png")
tmp = Path(tempfile.mkdtemp())
npe2_entry.samples_dir = lambda: tmp  # leave the grader's own sample project alone

viewer = napari.Viewer(title="napari-retina")
viewer.window.resize(1600, 1000)
_, widget = viewer.window.add_plugin_dock_widget("napari-retina", "Lesion annotator")
viewer.open_sample("napari-retina", "idrid")
shapes = widget.ellipses_layer
for code, centre, axes, angle in (("HE", (1490, 1960), (190, 110), 30), ("EX", (2350, 1350), (260, 140), -20)):
    from napari_retina.io.ellipses import Ellipse, ellipse_to_corners

    widget.set_lesion(code, activate=False)
    shapes.add(ellipse_to_corners(Ellipse(code, centre, axes, angle)), shape_type="ellipse")
widget.set_lesion("HE")
viewer.camera.center = (1500, 2300)
viewer.camera.zoom = 0.45


def shoot():
    img = viewer.screenshot(canvas_only=False, flash=False)
    from PIL import Image

    Image.fromarray(np.asarray(img)).convert("RGB").save(out)
    print(f"wrote {out} {img.shape}")
    widget._timer.stop()
    viewer.close()


QTimer.singleShot(3000, shoot)
napari.run()
