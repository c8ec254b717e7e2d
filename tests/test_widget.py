"""The lesion annotator dock in a real napari viewer, driven by keys, clicks and layer events."""

import json
import os
import signal
import subprocess
import sys
import textwrap
import time
from pathlib import Path

import numpy as np
import pytest
from qtpy.QtCore import QPoint, Qt

from conftest import EX_BLOBS, blob_mask
from napari_retina.io.ellipses import load_ellipses
from napari_retina.io.masks import read_mask
from napari_retina.widgets.annotator import LesionAnnotator

ROOT = Path(__file__).resolve().parents[1]


@pytest.fixture
def annotator(make_napari_viewer, qtbot, flat_folder):
    viewer = make_napari_viewer()
    viewer.open(str(flat_folder), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False)
    widget.auto_refine.setChecked(False)  # manual annotation only; refinement has its own tests
    viewer.window.add_dock_widget(widget, name="Lesion annotator")
    qtbot.waitUntil(lambda: widget.fov is not None and bool(widget.summary), timeout=5000)
    yield viewer, widget
    widget.flush()
    widget._timer.stop()


def _press(viewer, qtbot, key, modifier=Qt.KeyboardModifier.NoModifier):
    canvas = viewer.window._qt_viewer.canvas.native
    canvas.setFocus()
    qtbot.keyClick(canvas, key, modifier)


def _paint_disc(layer, centre, label, radius=3):
    layer.brush_size = 2 * radius + 1
    layer.mode = "paint"
    layer.paint(centre, label)


def test_adopts_reader_layers_and_lists_the_folder(annotator, flat_folder):
    viewer, widget = annotator
    assert widget.opened.stem == "IDRiD_01"
    assert [widget.image_list.item(i).text() for i in range(widget.image_list.count())] == ["IDRiD_01.jpg", "IDRiD_02.jpg"]
    assert widget.project_label.text().endswith(str(flat_folder / "IDRiD_01.retina"))
    # the masks beside the image are counted: 2 EX blobs
    qtbot_rows = {r["lesion"]: r for r in widget.summary}
    assert qtbot_rows["EX"]["count"] == 2


def test_switch_class_by_key(annotator, qtbot):
    viewer, widget = annotator
    _press(viewer, qtbot, Qt.Key.Key_3, Qt.KeyboardModifier.AltModifier)
    assert widget.current == "MA"
    assert viewer.layers.selection.active is widget.lesion_layer("MA")
    assert widget.class_buttons.checkedId() == 2
    _press(viewer, qtbot, Qt.Key.Key_5, Qt.KeyboardModifier.AltModifier)
    assert widget.current == "OD" and viewer.layers.selection.active.name == "OD optic disc"


def test_ellipse_takes_the_class_and_its_colour(annotator, qtbot):
    viewer, widget = annotator
    widget.set_lesion("HE")
    qtbot.mouseClick(widget.ellipse_button, Qt.MouseButton.LeftButton)
    shapes = widget.ellipses_layer
    assert viewer.layers.selection.active is shapes and shapes.mode == "add_ellipse"
    shapes.add(np.array([[20, 30], [20, 50], [40, 50], [40, 30]]), shape_type="ellipse")
    assert shapes.features["lesion"].tolist() == ["HE"]
    assert shapes.features["id"].iloc[0] != ""
    np.testing.assert_allclose(shapes.edge_color[0][:3], np.array([255, 42, 42]) / 255, atol=0.01)
    # switching class while drawing keeps the ellipse tool, in the new class
    _press(viewer, qtbot, Qt.Key.Key_1, Qt.KeyboardModifier.AltModifier)
    assert viewer.layers.selection.active is shapes and shapes.feature_defaults["lesion"].iloc[0] == "EX"


def test_paint_is_autosaved_and_counted(annotator, qtbot, flat_folder):
    viewer, widget = annotator
    qtbot.mouseClick(widget.class_buttons.button(2), Qt.MouseButton.LeftButton)  # MA
    qtbot.mouseClick(widget.paint_button, Qt.MouseButton.LeftButton)
    layer = widget.lesion_layer("MA")
    assert viewer.layers.selection.active is layer and layer.mode == "paint"
    _paint_disc(layer, (20, 30), layer.selected_label, radius=2)
    _paint_disc(layer, (70, 90), layer.selected_label, radius=2)
    saved = flat_folder / "IDRiD_01.retina" / "IDRiD_01_MA.tif"
    qtbot.waitUntil(lambda: saved.exists() and read_mask(saved).sum() == (layer.data != 0).sum(), timeout=6000)
    assert read_mask(saved)[20, 30] and read_mask(saved)[70, 90]
    qtbot.waitUntil(lambda: widget.counts.item(2, 1).text() == "2", timeout=4000)
    # undo is an edit like any other: the file follows
    layer.undo()
    qtbot.waitUntil(lambda: not read_mask(saved)[70, 90], timeout=6000)
    assert read_mask(saved)[20, 30]


def test_step_to_next_image_saves_and_back_restores(annotator, qtbot, flat_folder):
    viewer, widget = annotator
    widget.set_lesion("SE")
    layer = widget.lesion_layer("SE")
    _paint_disc(layer, (40, 60), 4)
    widget.ellipses_layer.add(np.array([[10, 10], [10, 30], [20, 30], [20, 10]]), shape_type="ellipse")
    _press(viewer, qtbot, Qt.Key.Key_PageDown)
    qtbot.waitUntil(lambda: widget.opened is not None and widget.opened.stem == "IDRiD_02", timeout=6000)
    assert not widget.lesion_layer("SE").data.any()
    assert len(widget.ellipses_layer.data) == 0
    proj = flat_folder / "IDRiD_01.retina"
    widget.flush()
    assert read_mask(proj / "IDRiD_01_SE.tif")[40, 60]
    ef = load_ellipses(proj / "ellipses.json")
    assert [e.lesion for e in ef.ellipses] == ["SE"]
    assert ef.ellipses[0].center_xy == pytest.approx((20.0, 15.0))
    assert ef.ellipses[0].semi_axes == pytest.approx((10.0, 5.0))
    qtbot.mouseClick(widget.prev_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.opened.stem == "IDRiD_01", timeout=6000)
    assert widget.lesion_layer("SE").data[40, 60] == 4
    assert (widget.lesion_layer("EX").data != 0).sum() == blob_mask(EX_BLOBS).sum()
    assert widget.ellipses_layer.features["lesion"].tolist() == ["SE"]


def test_display_aids(annotator, qtbot):
    viewer, widget = annotator
    rgb = widget.opened.rgb
    widget.display_combo.setCurrentIndex(1)  # green channel
    qtbot.waitUntil(lambda: widget.image_layer.data is not rgb, timeout=4000)
    np.testing.assert_array_equal(widget.image_layer.data[..., 0], rgb[..., 1])
    widget.display_combo.setCurrentIndex(2)  # CLAHE
    qtbot.waitUntil(lambda: widget.image_layer.data.shape == rgb.shape and not np.array_equal(widget.image_layer.data[..., 0], rgb[..., 1]), timeout=4000)
    widget.display_combo.setCurrentIndex(0)
    assert widget.image_layer.data is rgb
    box = widget.fov_check
    qtbot.mouseClick(box, Qt.MouseButton.LeftButton, pos=QPoint(8, box.height() // 2))  # on the tick box
    assert box.isChecked()
    fov_layers = [l for l in viewer.layers if l.name == "field of view"]
    assert len(fov_layers) == 1
    yy, xx = np.mgrid[:96, :128]
    disc = (yy - 48) ** 2 + (xx - 64) ** 2 <= (0.45 * 96) ** 2
    iou = (fov_layers[0].data.astype(bool) & disc).sum() / (fov_layers[0].data.astype(bool) | disc).sum()
    assert iou > 0.9


def test_unwritable_project_folder_keeps_edits_and_says_so(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    blocker = tmp_path / "blocker"
    blocker.write_text("x")
    widget.set_project_root(blocker / "projects")
    qtbot.waitUntil(lambda: "NOT SAVED" in widget.status_label.text(), timeout=5000)
    layer = widget.lesion_layer("OD")
    _paint_disc(layer, (48, 90), 5)
    assert layer.data[48, 90] == 5  # the edit is still there
    good = tmp_path / "projects"
    widget.set_project_root(good)
    widget.flush()
    assert read_mask(good / "IDRiD_01.retina" / "IDRiD_01_OD.tif")[48, 90]


KILL_SCRIPT = textwrap.dedent(
    """
    import sys, numpy as np, napari
    from qtpy.QtCore import QTimer
    from napari_retina.widgets.annotator import LesionAnnotator
    folder = sys.argv[1]
    viewer = napari.Viewer(show=False)
    viewer.open(folder, plugin="napari-retina")
    w = LesionAnnotator(viewer, preload_model=False)
    def edit():
        layer = w.lesion_layer("HE")
        layer.brush_size = 5
        layer.paint((12, 100), 2)
        w.ellipses_layer.add(np.array([[60, 20], [60, 40], [70, 40], [70, 20]]), shape_type="ellipse")
    def report():
        if w.last_saved is not None and not w.has_unsaved_changes():
            print("SAVED", flush=True)
    QTimer.singleShot(500, edit)
    t = QTimer(); t.timeout.connect(report); t.start(200)
    napari.run()
    """
)


def test_killed_mid_session_reopen_restores_everything(flat_folder, tmp_path, make_napari_viewer, qtbot):
    script = tmp_path / "session.py"
    script.write_text(KILL_SCRIPT)
    proc = subprocess.Popen(
        [sys.executable, str(script), str(flat_folder)],
        stdout=subprocess.PIPE,
        stderr=subprocess.DEVNULL,
        text=True,
        env={**os.environ, "PYTHONPATH": str(ROOT)},
    )
    try:
        deadline = time.time() + 90
        line = ""
        while time.time() < deadline and "SAVED" not in line:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "SAVED" in line, "the session never autosaved"
    finally:
        proc.send_signal(signal.SIGKILL)  # no chance to flush anything on exit
        proc.wait(timeout=10)
    viewer = make_napari_viewer()
    viewer.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    assert viewer.layers["HE haemorrhages"].data[12, 100] == 2
    assert (viewer.layers["EX hard exudates"].data != 0).sum() == blob_mask(EX_BLOBS).sum()
    shapes = viewer.layers["ellipses"]
    assert shapes.features["lesion"].tolist() == ["EX"]
    np.testing.assert_allclose(shapes.data[0].mean(axis=0), [65, 30])
    assert not list((flat_folder / "IDRiD_01.retina").glob("*.tmp"))
