"""How long is napari's GUI thread busy while the Retrain dock trains a model?

    xvfb-run -a -s "-screen 0 1600x1000x24" .venv/bin/python benchmarks/train_responsiveness.py [--seconds 60]

Starts a real `python -m training exudates` from the Retrain models dock (its own process; a
full-size U-Net on three synthetic 96 x 128 images, so that it runs the whole time) and, for
`--seconds`, records every gap between the ticks of a 10 ms Qt timer on the GUI thread while the
dock reads the log once a second and redraws its plot. Prints the median, 95th percentile and
longest gap, the number of gaps over 100 ms, the epochs the dock saw, and the command.
Model versions go to a temporary data folder.
"""

import argparse
import os
import platform
import sys
import tempfile
import time
from pathlib import Path

import numpy as np

ROOT = Path(__file__).resolve().parents[1]
sys.path.insert(0, str(ROOT / "tests"))
os.environ["NAPARI_RETINA_DATA"] = tempfile.mkdtemp()

from conftest import write_exudate_folder  # noqa: E402


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--seconds", type=float, default=60.0)
    a = p.parse_args()
    import napari
    from qtpy.QtCore import QTimer
    from qtpy.QtWidgets import QApplication

    from napari_retina.widgets.annotator import LesionAnnotator
    from napari_retina.widgets.train import TrainWidget

    folder = write_exudate_folder(Path(tempfile.mkdtemp()) / "corrected")
    viewer = napari.Viewer(title="napari-retina")
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
    train.epochs_spin.setValue(1000)
    train.batch_spin.setValue(2)
    train.extra_edit.setText("--samples-per-epoch 8 --patch-size 64 --scale 1.0 --val-images IDRiD_03.png")
    ticks: list[float] = []
    timer = QTimer()
    timer.setInterval(10)
    timer.timeout.connect(lambda: ticks.append(time.perf_counter()))
    timer.start()
    t0 = time.perf_counter()
    train.start()
    while time.perf_counter() - t0 < a.seconds:
        app.processEvents()
        time.sleep(0.002)
    timer.stop()
    epochs = len([e for e in train.events if e.get("event") == "epoch"])
    train.cancel()
    while train.process is not None:
        app.processEvents()
        time.sleep(0.01)
    gaps = np.diff(np.array([t0] + ticks)) * 1000
    print(f"GUI thread while training ran {a.seconds:.0f} s ({epochs} epochs seen by the dock): gap between 10 ms ticks "
          f"median {np.median(gaps):.0f} ms, p95 {np.percentile(gaps, 95):.0f} ms, longest {gaps.max():.0f} ms, "
          f"{int((gaps > 100).sum())} over 100 ms")
    print(f"machine: {platform.machine()}, {os.cpu_count()} CPUs; command: xvfb-run -a -s \"-screen 0 1600x1000x24\" "
          f".venv/bin/python benchmarks/train_responsiveness.py {' '.join(sys.argv[1:])}")
    ann.flush()
    return 0


if __name__ == "__main__":
    sys.exit(main())
