"""The way a grader reaches the tool: docks from the Plugins menu (napari hands them a proxy of
the viewer), files through File > Open (`viewer.open`). One annotation session per viewer:
every dock, the reader and the model choice act on the same image, project and models."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from conftest import fundus_rgb
from napari_retina.io.ellipses import Ellipse, ellipse_to_corners
from napari_retina.io.masks import read_mask
from napari_retina.lesions import LESIONS, lesion
from napari_retina.models.folder import write_model_folder
from napari_retina.nets.refiner import RefinerNet
from napari_retina.nets.segmentation import SegmentationNet
from napari_retina.widgets.viewer_session import session_of

PLUGIN = "napari-retina"
ANNOTATOR, RETRAIN = "Lesion annotator", "Retrain models"


def _ex_model(folder, version: str, seed: int):
    torch.manual_seed(seed)
    net = SegmentationNet(backbone="unet", base_channels=4, depth=2)
    with torch.no_grad():
        net.classifier.weight.mul_(40.0)
    cfg = {"model": "exudates", "lesion": "EX", "version": version, "net": net.config(), "input_scale": 1.0,
           "tile": 32, "overlap": 16, "threshold": 0.5, "batch": 1}
    return write_model_folder(folder, net.state_dict(), cfg, "test {sha256}")


def _refiner(folder, version: str, seed: int):
    torch.manual_seed(seed)
    net = RefinerNet(base_channels=8, fused_channels=16)
    cfg = {"model": "refiner", "net": net.config(), "geometry": {"size": 128}, "threshold": 0.5, "version": version}
    return write_model_folder(folder, net.state_dict(), cfg, "test {sha256}")


@pytest.fixture(scope="module")
def models(tmp_path_factory):
    root = tmp_path_factory.mktemp("models")
    return {
        "ex-a": _ex_model(root / "ex-a", "ex-a", 0),
        "ex-b": _ex_model(root / "ex-b", "ex-b", 1),
        "ref-a": _refiner(root / "ref-a", "ref-a", 0),
        "ref-b": _refiner(root / "ref-b", "ref-b", 1),
    }


@pytest.fixture(autouse=True)
def _models_loaded_before_teardown(make_napari_viewer, qtbot):
    """A dock from the Plugins menu loads the refiner at once: let that end before the window goes
    (this fixture comes after make_napari_viewer, so it ends before the viewers close)."""
    _OPENED.clear()
    yield
    for ann in list(_OPENED):
        qtbot.waitUntil(lambda: not ann.refinement._loading, timeout=60000)


def _open_docks(viewer, order):
    widgets = {}
    for name in order:
        _, widget = viewer.window.add_plugin_dock_widget(PLUGIN, name)
        widgets[name] = widget
    _OPENED.append(widgets[ANNOTATOR])
    return widgets[ANNOTATOR], widgets[RETRAIN]


_OPENED: list = []


def _pin_test_models(viewer, models):
    """Small models instead of the shipped ones, for this viewer only."""
    s = session_of(viewer)
    s.pin_model("refiner", models["ref-a"])
    s.pin_model("exudates", models["ex-a"])


def _viewer_with_image(make_napari_viewer, qtbot, models, path):
    """A viewer with small test models, both docks from the Plugins menu, and `path` opened by File > Open."""
    viewer = make_napari_viewer()
    _pin_test_models(viewer, models)
    ann, _ = _open_docks(viewer, (ANNOTATOR, RETRAIN))
    viewer.open(str(path), plugin=PLUGIN)
    qtbot.waitUntil(lambda: ann.opened is not None, timeout=10000)
    return viewer, ann


def _lesion_layers(viewer):
    return [layer for layer in viewer.layers if layer.name.split(" [")[0] in {les.layer_name for les in LESIONS}]


@pytest.mark.parametrize("order", [(ANNOTATOR, RETRAIN), (RETRAIN, ANNOTATOR)])
def test_docks_from_the_plugins_menu_share_the_viewers_session_in_either_order(make_napari_viewer, qtbot, flat_folder, order):
    viewer = make_napari_viewer()
    ann, train = _open_docks(viewer, order)
    session = session_of(viewer)
    assert session_of(ann.viewer) is session and session_of(train.viewer) is session
    assert session_of(make_napari_viewer()) is not session  # another window, another session
    viewer.open(str(flat_folder), plugin=PLUGIN)  # File > Open of a folder
    qtbot.waitUntil(lambda: ann.opened is not None, timeout=10000)
    assert session.opened is ann.opened and session.data_folder == flat_folder
    qtbot.waitUntil(lambda: train.data_edit.text() == str(flat_folder), timeout=5000)
    ann.flush()


@pytest.mark.parametrize("order", [(ANNOTATOR, RETRAIN), (RETRAIN, ANNOTATOR)])
def test_the_second_dock_opened_becomes_a_tab_beside_the_first(make_napari_viewer, qtbot, order):
    from qtpy.QtWidgets import QDockWidget

    viewer = make_napari_viewer(show=True)
    docks = [viewer.window.add_plugin_dock_widget(PLUGIN, name)[0] for name in order]
    _OPENED.append(viewer.window.add_plugin_dock_widget(PLUGIN, ANNOTATOR)[1])
    window = docks[0].window()
    assert all(isinstance(d, QDockWidget) for d in docks)
    qtbot.waitUntil(lambda: docks[1] in window.tabifiedDockWidgets(docks[0]), timeout=5000)


def _find(ann, qtbot):
    finder = ann.exudate_finder
    with qtbot.waitSignal(finder.finished, timeout=60000):
        qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)


def _draw(ann, e: Ellipse):
    ann.set_lesion(e.lesion)
    ann.ellipses_layer.add_ellipses(np.asarray([ellipse_to_corners(e)]))


def test_a_version_put_in_use_is_the_one_the_next_find_and_refinement_run(make_napari_viewer, qtbot, flat_folder, models,
                                                                           monkeypatch):
    viewer = make_napari_viewer()
    _pin_test_models(viewer, models)
    ann, train = _open_docks(viewer, (RETRAIN, ANNOTATOR))
    viewer.open(str(flat_folder / "IDRiD_02.jpg"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: ann.opened is not None, timeout=10000)
    proj = ann.opened.project_dir
    _find(ann, qtbot)
    ann.flush()
    prov = json.loads((proj / "provenance.json").read_text())
    assert prov["models"]["exudates"]["version"] == "ex-a"

    # the Retrain dock's version list: a version imported there, then "Use selected", for each kind
    import napari_retina.widgets.train as train_module
    from napari_retina.models.versions import import_model

    monkeypatch.setattr(train_module, "confirm_use", lambda parent, text: True)  # an unvalidated version asks
    for label, model in (("hard-exudate segmenter", "ex-b"), ("ellipse refiner", "ref-b")):
        copy = import_model(models[model])
        train.model_combo.setCurrentText(label)
        train._refresh_versions()
        row = [i for i, v in enumerate(train._versions) if v.folder == copy][0]
        train.version_list.setCurrentRow(row)
        qtbot.mouseClick(train.select_button, Qt.MouseButton.LeftButton)
        assert session_of(viewer).model_dir(copy.parent.name) == copy.resolve()
    _find(ann, qtbot)
    with qtbot.waitSignal(ann.refinement.refined, timeout=30000):
        _draw(ann, Ellipse("EX", (60.0, 45.0), (10.0, 8.0), 0.0))
    ann.flush()
    prov = json.loads((proj / "provenance.json").read_text())
    assert prov["models"]["exudates"]["version"] == "ex-b"
    assert prov["models"]["refiner"]["version"] == "ref-b"
    table = json.loads((proj / "proposals.json").read_text())
    versions = {p["description"].get("version") for p in table["proposals"] if p["description"].get("model") == "refiner"}
    assert versions == {"ref-b"}


def test_file_open_of_another_image_switches_the_session_and_saves_both(make_napari_viewer, qtbot, flat_folder, models):
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, flat_folder / "IDRiD_01.jpg")
    first = ann.opened
    ex = ann.lesion_layer("EX")
    ex.brush_size = 3
    ex.paint((20, 20), 1)  # an edit on A, not yet saved when B opens

    viewer.open(str(flat_folder / "IDRiD_02.jpg"), plugin=PLUGIN)  # File > Open of B while A is open
    qtbot.waitUntil(lambda: ann.opened is not None and ann.opened is not first, timeout=10000)
    assert ann.opened.record.image.name == "IDRiD_02.jpg"
    assert "IDRiD_02.jpg" in ann.image_label.text()
    names = sorted(layer.name for layer in _lesion_layers(viewer))
    assert names == sorted(les.layer_name for les in LESIONS)  # one set, no "[1]" copies
    assert [layer.name for layer in viewer.layers if layer.name.startswith("IDRiD_")] == ["IDRiD_02"]
    assert session_of(viewer).opened is ann.opened

    he = ann.lesion_layer("HE")
    assert he is not ex and he.data.shape == (96, 128)
    he.brush_size = 3
    he.paint((40, 60), lesion("HE").label)
    b_project = flat_folder / "IDRiD_02.retina"
    qtbot.waitUntil(lambda: (b_project / "IDRiD_02_HE.tif").is_file(), timeout=5000)  # within the autosave delay
    qtbot.waitUntil(lambda: read_mask(b_project / "IDRiD_02_HE.tif")[40, 60], timeout=5000)
    a_mask = read_mask(flat_folder / "IDRiD_01.retina" / "IDRiD_01_EX.tif")
    assert a_mask[20, 20]  # A's edit was saved when B opened
    ann.flush()


def test_opening_the_image_already_open_keeps_its_unsaved_edits(make_napari_viewer, qtbot, flat_folder):
    viewer = make_napari_viewer()
    ann, _ = _open_docks(viewer, (ANNOTATOR, RETRAIN))
    viewer.open(str(flat_folder / "IDRiD_02.jpg"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: ann.opened is not None, timeout=10000)
    opened = ann.opened
    ex = ann.lesion_layer("EX")
    ex.paint((30, 30), 1)
    viewer.open(str(flat_folder / "IDRiD_02.jpg"), plugin=PLUGIN)
    qtbot.wait(50)
    assert ann.opened is opened and ann.lesion_layer("EX") is ex and ex.data[30, 30] == 1
    assert len(_lesion_layers(viewer)) == len(LESIONS)
    ann.flush()


def test_find_with_nothing_accepted_leaves_no_pending_pixel_on_disk_and_comes_back(make_napari_viewer, qtbot, flat_folder, models):
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, flat_folder / "IDRiD_02.jpg")
    _find(ann, qtbot)
    layer = ann.lesion_layer("EX")
    les = lesion("EX")
    pending = layer.data == les.pending_label
    assert pending.any() and not (layer.data == les.label).any()  # shown lighter, none confirmed
    ann.flush()
    proj = flat_folder / "IDRiD_02.retina"
    assert not read_mask(proj / "IDRiD_02_EX.tif").any()

    viewer2 = make_napari_viewer()
    _pin_test_models(viewer2, models)
    ann2, _ = _open_docks(viewer2, (RETRAIN, ANNOTATOR))
    viewer2.open(str(proj), plugin=PLUGIN)  # the project folder, through File > Open
    qtbot.waitUntil(lambda: ann2.opened is not None, timeout=10000)
    assert np.array_equal(ann2.lesion_layer("EX").data == les.pending_label, pending)

    # one Accept for the class: the pending pixels become the grader's, and the mask on disk holds them
    ann2.set_lesion("EX")
    qtbot.mouseClick(ann2.accept_button, Qt.MouseButton.LeftButton)
    assert np.array_equal(ann2.lesion_layer("EX").data == les.label, pending)
    ann2.flush()
    assert np.array_equal(read_mask(proj / "IDRiD_02_EX.tif"), pending)


def test_an_image_that_is_not_a_fundus_photograph_is_noticed_once_and_finders_ask(make_napari_viewer, qtbot, tmp_path, models, monkeypatch):
    from PIL import Image

    from napari_retina.widgets import segment

    rng = np.random.default_rng(0)
    Image.fromarray(rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)).save(tmp_path / "noise.png")
    Image.fromarray(fundus_rgb(3)).save(tmp_path / "fundus.png")
    notices = []
    monkeypatch.setattr("napari_retina.widgets.annotator.show_info", lambda m: notices.append(m))
    asked = []
    monkeypatch.setattr(segment, "confirm_not_fundus", lambda parent, name: asked.append(name) or False)
    viewer = make_napari_viewer()
    _pin_test_models(viewer, models)
    ann, _ = _open_docks(viewer, (ANNOTATOR, RETRAIN))
    viewer.open(str(tmp_path / "noise.png"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: ann.opened is not None and ann.opened.fundus is not None, timeout=10000)
    assert ann.opened.fundus is False
    assert sum("does not look like a fundus photograph" in m for m in notices) == 1
    qtbot.mouseClick(ann.exudate_finder.find_button, Qt.MouseButton.LeftButton)
    assert asked == ["noise.png"] and not ann.exudate_finder.running
    assert not (ann.lesion_layer("EX").data != 0).any()

    viewer.open(str(tmp_path / "fundus.png"), plugin=PLUGIN)
    qtbot.waitUntil(lambda: ann.opened is not None and ann.opened.record.image.name == "fundus.png"
                    and ann.opened.fundus is not None, timeout=10000)
    assert ann.opened.fundus is True
    viewer.open(str(tmp_path / "noise.png"), plugin=PLUGIN)  # back to it: no second notice
    qtbot.waitUntil(lambda: ann.opened.record.image.name == "noise.png" and ann.opened.fundus is not None, timeout=10000)
    assert sum("does not look like a fundus photograph" in m for m in notices) == 1
    ann.flush()


def test_napari_retina_open_shows_the_whole_fundus_and_the_dock_without_scrolling(make_napari_viewer, qtbot, flat_folder, monkeypatch):
    import napari

    from napari_retina import cli

    made = []
    monkeypatch.setattr(napari, "Viewer", lambda **kw: made.append(make_napari_viewer(show=True, **kw)) or made[-1])
    monkeypatch.setattr(napari, "run", lambda: None)
    assert cli.main(["open", str(flat_folder / "IDRiD_01.jpg")]) == 0
    viewer = made[0]
    session = session_of(viewer)
    qtbot.waitUntil(lambda: session.opened is not None, timeout=10000)
    _, _, width, height = viewer.window.geometry()
    assert (width, height) == cli.OPEN_WINDOW  # the test screen is 1600x1000
    _, dock = viewer.window.add_plugin_dock_widget(PLUGIN, ANNOTATOR)  # the one `open` docked
    assert dock.opened is session.opened
    _OPENED.append(dock)
    qtbot.waitUntil(lambda: dock._scroll.viewport().height() > 0, timeout=5000)
    qtbot.wait(200)
    for page in (0, 1):
        dock.tabs.setCurrentIndex(page)
        qtbot.wait(50)
        assert dock._scroll.verticalScrollBar().maximum() == 0, page  # nothing to scroll to
    dock.flush()



@pytest.mark.slow
def test_a_graders_day_end_to_end(make_napari_viewer, qtbot, tmp_path, models, monkeypatch):
    """Open a folder, draw an ellipse, Find, erase part, accept, File > Open the next image, paint,
    Find microaneurysms and review two candidates,
    train a tiny model from the Retrain dock, use it, Find again, close and reopen everything."""
    import warnings

    import napari_retina.widgets.train as train_module
    from conftest import write_exudate_folder, write_ma_detector

    folder = write_exudate_folder(tmp_path / "day")
    monkeypatch.setattr(train_module, "confirm_use", lambda parent, text: True)  # "use it anyway"
    les = lesion("EX")
    with warnings.catch_warnings(record=True) as caught:
        warnings.simplefilter("always")
        viewer = make_napari_viewer()
        _pin_test_models(viewer, models)
        ann, train = _open_docks(viewer, (ANNOTATOR, RETRAIN))
        viewer.open(str(folder), plugin=PLUGIN)  # File > Open of the folder
        qtbot.waitUntil(lambda: ann.opened is not None, timeout=10000)
        assert ann.opened.record.image.name == "IDRiD_01.png" and train.data_edit.text() == str(folder)

        with qtbot.waitSignal(ann.refinement.refined, timeout=30000):
            _draw(ann, Ellipse("HE", (50.0, 40.0), (9.0, 7.0), 0.0))
        _find(ann, qtbot)
        ex = ann.lesion_layer("EX")
        pending = ex.data == les.pending_label
        assert pending.any()
        rows, cols = np.nonzero(pending)
        erase_at = (int(rows[0]), int(cols[0]))
        ex.brush_size = 3
        ex.mode = "erase"
        ex.paint(erase_at, 0)  # the eraser on a false candidate
        ann.set_lesion("EX")  # the HE ellipse made HE the active class
        qtbot.mouseClick(ann.accept_button, Qt.MouseButton.LeftButton)  # Accept EX: the rest is the grader's
        first_ex = ex.data == les.label
        assert first_ex.any() and not first_ex[erase_at] and not (ex.data == les.pending_label).any()
        first_he = ann.lesion_layer("HE").data.copy()  # the refined ellipse, still pending

        viewer.open(str(folder / "IDRiD_02.png"), plugin=PLUGIN)  # the next image through File > Open
        qtbot.waitUntil(lambda: ann.opened.record.image.name == "IDRiD_02.png", timeout=10000)
        ma = ann.lesion_layer("MA")
        ma.brush_size = 2
        ma.paint((30, 70), lesion("MA").label)
        # Find microaneurysms, then review: accept the most probable candidate, reject the next
        session_of(viewer).pin_model("microaneurysms", write_ma_detector(tmp_path / "ma", ann.opened.rgb))
        with qtbot.waitSignal(ann.ma_finder.finished, timeout=60000):
            qtbot.mouseClick(ann.ma_finder.find_button, Qt.MouseButton.LeftButton)
        qtbot.mouseClick(ann.ma_review.review_button, Qt.MouseButton.LeftButton)
        qtbot.mouseClick(ann.ma_review.accept_button, Qt.MouseButton.LeftButton)
        qtbot.mouseClick(ann.ma_review.reject_button, Qt.MouseButton.LeftButton)
        if ann.ma_review.reviewing:
            qtbot.mouseClick(ann.ma_review.review_button, Qt.MouseButton.LeftButton)
        assert "accepted 1 · rejected 1" in ann.ma_review.counts_label.text()
        second_ma = ma.data == lesion("MA").label

        # train a tiny exudate segmenter from the dock, on the folder's ground truth
        train.model_combo.setCurrentText("hard-exudate segmenter")
        train.start_combo.setCurrentText("scratch")
        train.device_combo.setCurrentText("cpu")
        train.epochs_spin.setValue(1)
        train.batch_spin.setValue(4)
        train.extra_edit.setText("--samples-per-epoch 8 --patch-size 32 --scale 1.0 --base-channels 4 --depth 2 "
                                 "--val-images IDRiD_03.png")
        qtbot.mouseClick(train.start_button, Qt.MouseButton.LeftButton)
        qtbot.waitUntil(lambda: train.process is None, timeout=240000)
        new = train.out
        assert (new / "config.json").is_file(), train.status.text()
        qtbot.mouseClick(train.use_button, Qt.MouseButton.LeftButton)
        assert session_of(viewer).model_dir("exudates") == new.resolve()
        new_version = json.loads((new / "config.json").read_text())["version"]
        _find(ann, qtbot)  # Find again: the new version proposes
        second_ex_pending = ann.lesion_layer("EX").data == les.pending_label
        ann.flush()
        viewer.close()
    napari_warnings = [str(w.message) for w in caught
                       if issubclass(w.category, (FutureWarning, DeprecationWarning)) and "napari" in str(w.message).lower()]
    assert not napari_warnings, napari_warnings

    one, two = folder / "IDRiD_01.retina", folder / "IDRiD_02.retina"
    assert np.array_equal(read_mask(one / "IDRiD_01_EX.tif"), first_ex)  # confirmed pixels only on disk
    assert not read_mask(one / "IDRiD_01_HE.tif").any()  # the ellipse's pixels were never accepted
    assert np.array_equal(read_mask(two / "IDRiD_02_MA.tif"), second_ma)
    # the data set's own mask as opened, none of the new version's pending candidates
    assert np.array_equal(read_mask(two / "IDRiD_02_EX.tif"), read_mask(folder / "IDRiD_02_EX.tif"))
    prov_one = json.loads((one / "provenance.json").read_text())
    prov_two = json.loads((two / "provenance.json").read_text())
    assert prov_one["models"]["exudates"]["version"] == "ex-a" and prov_one["models"]["refiner"]["version"] == "ref-a"
    assert prov_two["models"]["exudates"]["version"] == new_version

    viewer2 = make_napari_viewer()  # the next morning: everything is back
    _pin_test_models(viewer2, models)
    session_of(viewer2).pin_model("exudates", None)
    ann2, _ = _open_docks(viewer2, (RETRAIN, ANNOTATOR))
    viewer2.open(str(folder), plugin=PLUGIN)
    qtbot.waitUntil(lambda: ann2.opened is not None, timeout=10000)
    assert np.array_equal(ann2.lesion_layer("EX").data == les.label, first_ex)
    assert np.array_equal(ann2.lesion_layer("HE").data, first_he)  # the ellipse's proposal, pending again
    ann2.next_image()
    qtbot.waitUntil(lambda: ann2.opened.record.image.name == "IDRiD_02.png", timeout=10000)
    assert np.array_equal(ann2.lesion_layer("MA").data == lesion("MA").label, second_ma)  # the accepted candidate too
    assert np.array_equal(ann2.lesion_layer("EX").data == les.pending_label, second_ex_pending)
    ann2.flush()


_PAINT_THEN_WAIT = r"""
import sys
import napari
from qtpy.QtCore import QTimer

viewer = napari.Viewer(show=False)
_, ann = viewer.window.add_plugin_dock_widget("napari-retina", "Lesion annotator")
viewer.open(sys.argv[1], plugin="napari-retina")

def paint():
    if ann.opened is None:
        QTimer.singleShot(50, paint)
        return
    layer = ann.lesion_layer("HE")
    layer.brush_size = 5
    layer.paint((40, 60), 2)
    print("painted", flush=True)

QTimer.singleShot(50, paint)
napari.run()
"""


@pytest.mark.slow
def test_a_killed_napari_loses_no_stroke_older_than_the_autosave_delay(tmp_path, flat_folder):
    """SIGKILL while painting: what was painted more than ~2 s before is in the project folder."""
    import os
    import signal
    import subprocess
    import sys
    import time

    from napari_retina.session import SAVE_AT_LATEST_S, SAVE_WHEN_QUIET_S

    script = tmp_path / "paint.py"
    script.write_text(_PAINT_THEN_WAIT)
    env = dict(os.environ, NAPARI_RETINA_DATA=str(tmp_path / "data"))
    proc = subprocess.Popen([sys.executable, str(script), str(flat_folder / "IDRiD_02.jpg")], stdout=subprocess.PIPE,
                            stderr=subprocess.DEVNULL, text=True, env=env)
    try:
        deadline = time.monotonic() + 120
        line = ""
        while "painted" not in line and time.monotonic() < deadline:
            line = proc.stdout.readline()
            if not line and proc.poll() is not None:
                break
        assert "painted" in line, "napari did not start"
        time.sleep(SAVE_WHEN_QUIET_S + SAVE_AT_LATEST_S + 0.5)  # the autosave delay, and a little
    finally:
        proc.send_signal(signal.SIGKILL)
        proc.wait(30)
    mask = read_mask(flat_folder / "IDRiD_02.retina" / "IDRiD_02_HE.tif")
    assert mask[40, 60] and mask[38:43, 58:63].sum() >= 9


def test_a_truncated_photograph_in_the_image_list_is_one_message_and_keeps_the_open_image(
        make_napari_viewer, qtbot, flat_folder, models, monkeypatch):
    data = (flat_folder / "IDRiD_02.jpg").read_bytes()
    (flat_folder / "IDRiD_02.jpg").write_bytes(data[: len(data) // 2])  # a copy cut short
    errors = []
    monkeypatch.setattr("napari_retina.widgets.annotator.show_error", errors.append)
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, flat_folder)
    first = ann.opened
    qtbot.mouseClick(ann.next_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not ann._loading, timeout=10000)
    qtbot.wait(200)  # a second report would come from the worker's re-raised error
    assert len(errors) == 1 and "IDRiD_02.jpg" in errors[0], errors
    assert ann.opened is first and ann.image_layer is not None
    ann.flush()


def test_open_sample_while_an_image_is_open_switches_to_it(make_napari_viewer, qtbot, flat_folder, models, user_data_folder):
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, flat_folder / "IDRiD_01.jpg")
    viewer.open_sample(PLUGIN, "retina")  # File > Open Sample > napari-retina > Retina
    qtbot.waitUntil(lambda: ann.opened.record.image.name == "retina.png", timeout=20000)
    assert len(_lesion_layers(viewer)) == len(LESIONS) and "retina.png" in ann.image_label.text()
    assert ann.opened.project_dir.parent == user_data_folder / "samples"  # never beside the installed package
    ann.flush()


def test_file_open_while_the_dock_opens_another_image_is_switched_to_next(make_napari_viewer, qtbot, tmp_path, models):
    from PIL import Image

    folder = tmp_path / "three"
    folder.mkdir()
    for i in (1, 2, 3):
        Image.fromarray(fundus_rgb(i)).save(folder / f"IDRiD_{i:02d}.jpg", quality=95)
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, folder)
    ann.next_image()  # the dock loads IDRiD_02 in the background...
    assert ann._loading
    viewer.open(str(folder / "IDRiD_03.jpg"), plugin=PLUGIN)  # ...while the grader opens IDRiD_03
    qtbot.waitUntil(lambda: not ann._loading and ann.opened.record.image.name == "IDRiD_03.jpg", timeout=10000)
    qtbot.wait(100)
    assert ann.opened.record.image.name == "IDRiD_03.jpg"  # the grader's last choice wins
    assert len(_lesion_layers(viewer)) == len(LESIONS)
    assert [layer.name for layer in viewer.layers if layer.name.startswith("IDRiD_")] == ["IDRiD_03"]
    ann.flush()


def test_file_open_of_the_open_images_project_folder_keeps_the_live_image(make_napari_viewer, qtbot, flat_folder, models):
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, flat_folder / "IDRiD_02.jpg")
    opened = ann.opened
    ann.lesion_layer("HE").paint((40, 60), lesion("HE").label)
    ann.flush()
    ann.lesion_layer("HE").paint((20, 20), lesion("HE").label)  # not saved yet
    viewer.open(str(flat_folder / "IDRiD_02.retina"), plugin=PLUGIN)
    qtbot.wait(100)
    assert ann.opened is opened and ann.lesion_layer("HE").data[20, 20] == lesion("HE").label
    assert len(_lesion_layers(viewer)) == len(LESIONS)
    ann.flush()
    assert read_mask(flat_folder / "IDRiD_02.retina" / "IDRiD_02_HE.tif")[20, 20]


def test_painting_over_pending_pixels_confirms_them_and_undo_makes_them_pending_again(make_napari_viewer, qtbot, flat_folder, models):
    viewer, ann = _viewer_with_image(make_napari_viewer, qtbot, models, flat_folder / "IDRiD_02.jpg")
    _find(ann, qtbot)
    les = lesion("EX")
    layer = ann.lesion_layer("EX")
    rows, cols = np.nonzero(layer.data == les.pending_label)
    at = (int(rows[len(rows) // 2]), int(cols[len(cols) // 2]))
    layer.brush_size = 1
    layer.selected_label = les.label
    layer.paint(at, les.label)  # the brush over a pending pixel
    record = ann.opened.annotation.record
    assert layer.data[at] == les.label and record.hand("EX")[at]
    ann.flush()
    assert read_mask(flat_folder / "IDRiD_02.retina" / "IDRiD_02_EX.tif")[at]
    layer.undo()
    qtbot.waitUntil(lambda: not record.hand("EX")[at], timeout=3000)
    assert layer.data[at] == les.pending_label and ann.opened.annotation.masks["EX"][at]  # still proposed
    ann.flush()
    assert not read_mask(flat_folder / "IDRiD_02.retina" / "IDRiD_02_EX.tif")[at]
