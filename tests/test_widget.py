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


def _temporaries(folder):
    """Leftover temporary files of atomic writes (hidden `.<name>.<random>.tmp<suffix>`)."""
    return [p for p in Path(folder).rglob(".*.tmp*")]


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


def test_each_drawn_or_pasted_ellipse_gets_its_own_id_and_author(annotator, qtbot):
    viewer, widget = annotator
    widget.grader_edit.setText("grader-a")
    shapes = widget.ellipses_layer
    widget.set_lesion("EX")
    shapes.add(np.array([[20, 30], [20, 50], [40, 50], [40, 30]]), shape_type="ellipse")
    widget.set_lesion("MA")
    shapes.add(np.array([[60, 30], [60, 40], [70, 40], [70, 30]]), shape_type="ellipse")
    shapes.selected_data = {1}
    shapes._copy_data()  # napari's Ctrl+C / Ctrl+V: the copy carries the original's features
    shapes._paste_data()
    ids = shapes.features["id"].tolist()
    assert len(ids) == 3 and len(set(ids)) == 3 and all(ids)
    assert shapes.features["lesion"].tolist() == ["EX", "MA", "MA"]
    assert all(widget.session.ellipse_extras[i]["author"] == "grader-a" for i in ids)
    colours = np.asarray(shapes.edge_color)[:, :3]
    np.testing.assert_allclose(colours[1], colours[2])
    assert not np.allclose(colours[0], colours[1])
    widget.current_ellipses()  # the session's ellipses, as data, follow the layer
    saved = {e.extra["id"]: (e.lesion, e.extra["author"]) for e in widget.session.ellipses.ellipses}
    assert saved == dict(zip(ids, [("EX", "grader-a"), ("MA", "grader-a"), ("MA", "grader-a")]))


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


def test_autosave_writes_only_the_changed_mask(annotator, qtbot, flat_folder):
    viewer, widget = annotator
    proj = flat_folder / "IDRiD_01.retina"
    _paint_disc(widget.lesion_layer("MA"), (20, 30), 3)
    qtbot.waitUntil(lambda: (proj / "IDRiD_01_MA.tif").exists() and not widget.has_unsaved_changes(), timeout=6000)
    files = [f"IDRiD_01_{c}.tif" for c in ("EX", "HE", "MA", "SE", "OD")] + ["ellipses.json"]
    assert all((proj / f).exists() for f in files)  # a new project gets every file
    before = {f: (proj / f).stat().st_mtime_ns for f in files}
    written = []
    import napari_retina.io.project as project_module

    real_write_mask = project_module.write_mask
    project_module.write_mask = lambda path, mask: (written.append(Path(path).name), real_write_mask(path, mask))[1]
    try:
        time.sleep(0.02)
        _paint_disc(widget.lesion_layer("SE"), (60, 70), 4)
        qtbot.waitUntil(lambda: bool(written) and not widget.has_unsaved_changes(), timeout=6000)
    finally:
        project_module.write_mask = real_write_mask
    assert written == ["IDRiD_01_SE.tif"]
    after = {f: (proj / f).stat().st_mtime_ns for f in files}
    assert [f for f in files if after[f] != before[f]] == ["IDRiD_01_SE.tif"]
    assert read_mask(proj / "IDRiD_01_SE.tif")[60, 70]


def test_erasing_and_undo_reach_the_file(annotator, qtbot, flat_folder):
    viewer, widget = annotator
    layer = widget.lesion_layer("EX")
    saved = flat_folder / "IDRiD_01.retina" / "IDRiD_01_EX.tif"
    layer.brush_size = 5
    layer.mode = "erase"
    layer.paint((30, 40), 0)  # the first EX blob's centre
    qtbot.waitUntil(lambda: saved.exists() and not read_mask(saved)[30, 40], timeout=6000)
    assert read_mask(saved)[60, 50]
    layer.undo()  # napari restores the data without a paint event
    qtbot.waitUntil(lambda: read_mask(saved)[30, 40], timeout=6000)
    np.testing.assert_array_equal(read_mask(saved), blob_mask(EX_BLOBS))
    layer.redo()
    qtbot.waitUntil(lambda: not read_mask(saved)[30, 40], timeout=6000)


@pytest.fixture
def shown_annotator(make_napari_viewer, qtbot, flat_folder):
    """The dock in a shown window of napari's default size, with napari's style sheet: for layout tests."""
    viewer = make_napari_viewer(show=True)
    viewer.open(str(flat_folder), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.isVisible() and widget._scroll.viewport().width() > 0, timeout=3000)
    yield widget
    widget.flush()
    widget._timer.stop()


def test_all_lesion_rows_of_the_count_table_are_visible(shown_annotator, qtbot):
    table = shown_annotator.counts
    shown_annotator.tabs.setCurrentIndex(1)  # the "Image & project" page holds the table
    qtbot.waitUntil(lambda: table.isVisible() and table.viewport().height() > 0, timeout=3000)
    qtbot.wait(100)
    assert table.rowCount() == 5
    for i in range(5):  # each row wholly inside the table's visible area
        rect = table.visualItemRect(table.item(i, 0))
        assert rect.top() >= 0 and rect.bottom() < table.viewport().height(), (i, rect, table.viewport().height())


def test_nothing_in_the_dock_is_cut_off_at_the_right(shown_annotator, qtbot):
    widget = shown_annotator
    qtbot.wait(200)
    viewport, content = widget._scroll.viewport(), widget._content
    assert content.width() <= viewport.width(), (content.width(), viewport.width())
    pages = {0: (widget.superpixel_check, widget.exudate_finder.cancel_button, widget.ma_review.next_button),
             1: (widget.fov_check, widget.counts, widget.save_button)}
    for page, shown in pages.items():
        widget.tabs.setCurrentIndex(page)
        qtbot.wait(50)
        for w in shown:
            assert w.isVisible()
            right = w.mapTo(content, w.rect().topRight()).x()
            assert right < viewport.width(), (type(w).__name__, right, viewport.width())


@pytest.fixture
def bad_mask_folder(tmp_path):
    """IDRiD_22 with an EX mask of the wrong size (100x100) and a good HE mask, then IDRiD_23."""
    from PIL import Image

    from conftest import fundus_rgb, write_palette_mask

    d = tmp_path / "bad"
    d.mkdir()
    for i, stem in enumerate(("IDRiD_22", "IDRiD_23")):
        Image.fromarray(fundus_rgb(i)).save(d / f"{stem}.jpg", quality=95)
    Image.fromarray(np.full((100, 100), 255, np.uint8)).save(d / "IDRiD_22_EX.tif")
    write_palette_mask(d / "IDRiD_22_HE.tif", blob_mask([(50, 60)]))
    return d


def test_one_bad_mask_costs_only_that_mask(make_napari_viewer, qtbot, bad_mask_folder, monkeypatch):
    import napari_retina._npe2 as npe2_entry
    import napari_retina.widgets.annotator as annotator_module

    notes = []
    monkeypatch.setattr(npe2_entry, "notify_error", notes.append)
    monkeypatch.setattr(annotator_module, "show_error", notes.append)
    bad = bad_mask_folder / "IDRiD_22_EX.tif"
    bad_bytes = bad.read_bytes()
    viewer = make_napari_viewer()
    viewer.open(str(bad_mask_folder), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False)
    widget.auto_refine.setChecked(False)
    viewer.window.add_dock_widget(widget)
    assert [widget.image_list.item(i).text() for i in range(widget.image_list.count())] == ["IDRiD_22.jpg", "IDRiD_23.jpg"]
    assert widget.opened.stem == "IDRiD_22"
    assert not widget.lesion_layer("EX").data.any() and widget.lesion_layer("HE").data[50, 60]
    assert len(notes) == 1 and "IDRiD_22_EX.tif" in notes[0]
    # editing another lesion saves the project without an (empty) EX mask
    _paint_disc(widget.lesion_layer("MA"), (20, 30), 3)
    widget.flush()
    proj = bad_mask_folder / "IDRiD_22.retina"
    assert read_mask(proj / "IDRiD_22_MA.tif")[20, 30] and read_mask(proj / "IDRiD_22_HE.tif")[50, 60]
    assert not (proj / "IDRiD_22_EX.tif").exists()
    assert bad.read_bytes() == bad_bytes
    # the next image is reachable
    qtbot.mouseClick(widget.next_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.opened.stem == "IDRiD_23", timeout=6000)
    assert len(notes) == 1
    widget.flush()
    widget._timer.stop()


def test_a_bad_mask_inside_a_project_is_not_overwritten_until_edited(make_napari_viewer, qtbot, flat_folder, monkeypatch):
    import napari_retina._npe2 as npe2_entry
    import napari_retina.widgets.annotator as annotator_module

    from PIL import Image

    viewer = make_napari_viewer()
    viewer.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False)
    _paint_disc(widget.lesion_layer("MA"), (20, 30), 3)
    widget.flush()
    widget._timer.stop()
    proj = flat_folder / "IDRiD_01.retina"
    bad = proj / "IDRiD_01_HE.tif"
    Image.fromarray(np.zeros((7, 9), np.uint8)).save(bad)  # damaged outside napari
    bad_bytes = bad.read_bytes()

    notes = []
    monkeypatch.setattr(npe2_entry, "notify_error", notes.append)
    monkeypatch.setattr(annotator_module, "show_error", notes.append)
    viewer2 = make_napari_viewer()
    viewer2.open(str(proj), plugin="napari-retina")
    w2 = LesionAnnotator(viewer2, preload_model=False)
    assert len(notes) == 1 and "IDRiD_01_HE.tif" in notes[0]
    assert w2.lesion_layer("MA").data[20, 30] and not w2.lesion_layer("HE").data.any()
    _paint_disc(w2.lesion_layer("SE"), (40, 40), 4)
    w2.flush()
    assert bad.read_bytes() == bad_bytes and read_mask(proj / "IDRiD_01_SE.tif")[40, 40]
    _paint_disc(w2.lesion_layer("HE"), (70, 70), 2)  # the grader edits HE: now it is written
    w2.flush()
    w2._timer.stop()
    np.testing.assert_array_equal(read_mask(bad), w2.lesion_layer("HE").data != 0)
    assert read_mask(bad)[70, 70]
    assert (proj / "IDRiD_01_HE.tif.unreadable").read_bytes() == bad_bytes
    assert len(notes) == 1


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
    assert _temporaries(flat_folder / "IDRiD_01.retina") == []


def test_opening_after_a_kill_mid_save_removes_its_temporary_files(flat_folder, make_napari_viewer, qtbot):
    viewer = make_napari_viewer()
    viewer.open(str(flat_folder), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False)
    _paint_disc(widget.lesion_layer("MA"), (20, 30), 3)
    widget.flush()
    widget._timer.stop()
    proj = flat_folder / "IDRiD_01.retina"
    left = proj / ".overlay.x7_k2m9q.tmp.png"  # what a save killed while writing the overlay leaves
    left.write_bytes(b"\x89PNG half")
    mine = proj / "notes.tmp.txt"
    mine.write_text("not a temporary file of ours")
    assert _temporaries(proj) == [left]
    viewer2 = make_napari_viewer()
    viewer2.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    assert viewer2.layers["MA microaneurysms"].data[20, 30] == 3
    assert _temporaries(proj) == [] and mine.exists()


def test_one_click_marks_a_lesion_reviewed_and_training_then_reads_the_corrected_mask(annotator, qtbot, flat_folder):
    from napari_retina.io.datasets import open_dataset
    from napari_retina.session import label_source
    from training.data import load_image

    viewer, widget = annotator
    widget.set_lesion("EX")
    layer = widget.lesion_layer("EX")
    _paint_disc(layer, (60, 20), 1)  # a correction the data set's mask lacks
    record = [r for r in open_dataset(flat_folder).records if r.stem == "IDRiD_01"][0]
    widget.flush()
    assert label_source(record, "EX") == "ground truth"  # corrected, but not reviewed yet
    assert not load_image(record, lesions=("EX",)).masks["EX"][60, 20]
    row = [i for i in range(widget.counts.rowCount()) if widget.counts.item(i, 0).text().startswith("EX")][0]
    item = widget.counts.item(row, 3)
    item.setCheckState(Qt.CheckState.Checked)  # the grader's one click
    widget.flush()
    assert widget.opened.annotation.reviewed == {"EX"}
    assert label_source(record, "EX") == "reviewed"
    assert load_image(record, lesions=("EX",)).masks["EX"][60, 20]
    # stepping away and back shows the mark; unmarking saves too
    _press(viewer, qtbot, Qt.Key.Key_PageDown)
    qtbot.waitUntil(lambda: widget.opened is not None and widget.opened.stem == "IDRiD_02", timeout=6000)
    assert widget.counts.item(row, 3).checkState() == Qt.CheckState.Unchecked
    qtbot.mouseClick(widget.prev_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: widget.opened.stem == "IDRiD_01", timeout=6000)
    assert widget.counts.item(row, 3).checkState() == Qt.CheckState.Checked
    widget.counts.item(row, 3).setCheckState(Qt.CheckState.Unchecked)
    widget.flush()
    assert label_source(record, "EX") == "ground truth"


def test_no_wrapped_message_in_the_dock_is_cut_off(shown_annotator, qtbot):
    # a long message grows its row (the dock scrolls rather than squeezing the rows) and a short one
    # shrinks it again
    widget = shown_annotator
    long = "91 candidates (10.9 s); review them, or accept all; " * 3
    labels = (widget.ma_finder.status, widget.exudate_finder.status, widget.status_label, widget.ma_review.counts_label)
    for label in labels:
        label.setText(long)
    qtbot.wait(200)
    for label in labels:
        needed = label.heightForWidth(label.width())
        assert needed > 2 * label.fontMetrics().lineSpacing() and label.height() >= needed, (label.text(), label.height(), needed)
    for label in labels:  # and back to one line: no gap left behind
        label.setText("saved")
    qtbot.wait(200)
    for label in labels:
        assert label.height() < 2 * label.fontMetrics().lineSpacing(), label.height()
