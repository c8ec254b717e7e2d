"""What the screenshot scripts share: the sample alone in a throw-away folder, a napari window
of the documentation's size with the annotator docked, and waiting for it in a live event loop."""

from __future__ import annotations

import shutil
import tempfile
import time
from pathlib import Path

ROOT = Path(__file__).resolve().parents[1]
SIZE = (1600, 1000)  # the window of every picture in docs/ (what `napari-retina open` opens)


def sample_copy() -> Path:
    """The IDRiD sample copied alone into a temporary folder (its ground-truth masks stay out of the picture)."""
    image = Path(tempfile.mkdtemp()) / "IDRiD_22.jpg"
    shutil.copy(ROOT / "napari_retina" / "samples" / "IDRiD_22.jpg", image)
    return image


def annotator_window(image: Path, **widget_kwargs):
    """(viewer, annotator, app): a napari window with the annotator docked, `image` opened."""
    import napari
    from qtpy.QtWidgets import QApplication

    from napari_retina.widgets.annotator import LesionAnnotator

    viewer = napari.Viewer(title="napari-retina")
    viewer.window.resize(*SIZE)
    widget = LesionAnnotator(viewer, **widget_kwargs)
    viewer.window.add_dock_widget(widget, name="Lesion annotator")
    widget.open_path(image)
    return viewer, widget, QApplication.instance()


def wait(cond, seconds: float = 120) -> None:
    """Run the event loop until `cond()` holds; exit the script if it does not within `seconds`.

    A real event loop, as napari runs: processEvents() alone never runs Qt's deferred deletes
    (a closed progress bar would stay, and napari's activity animation with it)."""
    from qtpy.QtCore import QEventLoop, QTimer

    if cond():
        return
    end = time.monotonic() + seconds
    loop, check = QEventLoop(), QTimer()
    check.setInterval(10)
    check.timeout.connect(lambda: loop.quit() if cond() or time.monotonic() > end else None)
    check.start()
    loop.exec()
    check.stop()
    if not cond():
        raise SystemExit(f"timed out after {seconds} s")


def settle(n: int = 50) -> None:
    """Let the window draw what changed (about a second)."""
    from qtpy.QtWidgets import QApplication

    app = QApplication.instance()
    for _ in range(n):
        app.processEvents()
        time.sleep(0.02)
