"""Make docs/retrain.png: the Retrain models dock after a short real training run, as a research group sees it.

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python scripts/screenshot_train.py [--out docs/retrain.png]

The data are three small synthetic fundus images with exudate masks, made here (a real
training set would take hours on a CPU); the run is a real `python -m training exudates` in
its own process, started from the dock, with a small network so that it ends in seconds.
Model versions go to a temporary data folder, never the user's.
"""

import argparse
import os
import sys
import tempfile
import time
from pathlib import Path

import numpy as np
from PIL import Image

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["NAPARI_RETINA_DATA"] = tempfile.mkdtemp()  # before the plugin reads it

from conftest import write_exudate_folder  # noqa: E402

p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
p.add_argument("--out", default=str(ROOT / "docs" / "retrain.png"))
a = p.parse_args()

import napari  # noqa: E402
from qtpy.QtWidgets import QApplication  # noqa: E402

from napari_retina.widgets.annotator import LesionAnnotator  # noqa: E402
from napari_retina.widgets.train import TrainWidget  # noqa: E402

folder = write_exudate_folder(Path(tempfile.mkdtemp()) / "corrected")

viewer = napari.Viewer(title="napari-retina")
viewer.window.resize(1600, 1000)
viewer.open(str(folder), plugin="napari-retina")
ann = LesionAnnotator(viewer, preload_model=False)
viewer.window.add_dock_widget(ann, name="Lesion annotator")
app = QApplication.instance()
while ann.opened is None:
    app.processEvents()
    time.sleep(0.01)
train = TrainWidget(viewer)
viewer.window.add_dock_widget(train, name="Retrain models", tabify=True)
train.model_combo.setCurrentText("hard-exudate segmenter")
train.start_combo.setCurrentText("scratch")
train.device_combo.setCurrentText("cpu")
train.epochs_spin.setValue(12)
train.batch_spin.setValue(4)
train.extra_edit.setText("--samples-per-epoch 16 --patch-size 32 --scale 1.0 --base-channels 4 --depth 2 "
                         "--val-images IDRiD_03.png")
train.start()
end = time.monotonic() + 300
while train.process is not None and time.monotonic() < end:
    app.processEvents()
    time.sleep(0.02)
for _ in range(40):
    app.processEvents()
    time.sleep(0.02)
Image.fromarray(np.asarray(viewer.screenshot(canvas_only=False, flash=False))).convert("RGB").save(a.out)
print(f"wrote {a.out}: {train.status.text()}")
ann.flush()
