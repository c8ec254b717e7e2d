"""Microaneurysms in the annotator, as a grader works: find, review with keys, click to add and remove, reopen, run again."""

import numpy as np
import pytest
from PIL import Image
from qtpy.QtCore import Qt

from conftest import fundus_rgb, write_ma_detector
from napari_retina.widgets.annotator import LesionAnnotator

DOTS = [(30, 40), (50, 90), (70, 30), (20, 100)]


@pytest.fixture
def ma_image(tmp_path):
    """A small fundus with four dark dots; no masks beside it."""
    d = tmp_path / "flat"
    d.mkdir()
    rgb = fundus_rgb(1)
    yy, xx = np.mgrid[: rgb.shape[0], : rgb.shape[1]]
    for cy, cx in DOTS:
        rgb[(yy - cy) ** 2 + (xx - cx) ** 2 <= 4] = (70, 25, 10)
    Image.fromarray(rgb).save(d / "IDRiD_01.png")
    return d / "IDRiD_01.png"


@pytest.fixture
def ma_model(tmp_path, ma_image):
    """A real (untrained, seeded) detector folder whose thresholds leave a handful of candidates."""
    return write_ma_detector(tmp_path / "ma-model", np.asarray(Image.open(ma_image).convert("RGB")))


def _open(make_napari_viewer, qtbot, image, model):
    viewer = make_napari_viewer()
    viewer.open(str(image), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False, ma_model_dir=model)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.opened is not None, timeout=10000)
    return viewer, widget


def _close(widget):
    widget.flush()
    widget._timer.stop()


def _press(viewer, qtbot, key):
    qtbot.keyClick(viewer.window._qt_viewer.canvas.native, key)


def test_find_review_with_keys_reopen_and_a_rerun_never_brings_a_rejected_candidate_back(
        make_napari_viewer, qtbot, ma_image, ma_model):
    viewer, widget = _open(make_napari_viewer, qtbot, ma_image, ma_model)
    finder, review = widget.ma_finder, widget.ma_review
    with qtbot.waitSignal(finder.finished, timeout=60000):
        qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    rec = widget.opened.annotation.record
    n = len(finder.proposals())
    assert n >= 3, finder.status.text()
    assert f"pending {n}" in review.counts_label.text()
    points = review.points_layer()  # every pending candidate ringed, visible at any zoom
    assert points is not None and len(points.data) == n
    assert viewer.layers.selection.active is not points  # painting stays on the lesion layer
    layer = widget.lesion_layer("MA")
    assert (layer.data != 0).any()
    # review: the most probable candidate first, zoomed in on it
    qtbot.mouseClick(review.review_button, Qt.MouseButton.LeftButton)
    assert review.reviewing
    scores = sorted((float(p.description["score"]) for p in finder.proposals()), reverse=True)
    first = rec.proposals[review.current]
    assert float(first.description["score"]) == scores[0]
    assert tuple(viewer.camera.center[-2:]) == pytest.approx(tuple(float(v) for v in first.description["centre"]))
    # outlined while reviewing, overlay and rings hidden: nothing covers the dark dot to judge
    overlay = finder.overlay_layer()
    assert layer.contour >= 1 and not overlay.visible and not points.visible
    # A accepts, R rejects, N skips, wherever the focus is (a grader who clicked Review has it on
    # that button): shortcuts of the application, which needs its window active
    from qtpy.QtWidgets import QApplication

    win = viewer.window._qt_window
    win.show()
    win.activateWindow()
    qtbot.waitUntil(lambda: QApplication.activeWindow() is not None, timeout=5000)
    review.review_button.setFocus()
    qtbot.keyClick(review.review_button, Qt.Key.Key_A)
    accepted_centre = first.description["centre"]
    assert review.current != first.id and first.id not in rec.proposals
    assert rec.hand("MA")[tuple(accepted_centre)]
    assert layer.data[tuple(accepted_centre)] == 3  # drawn as confirmed at once, no longer the lighter pending
    rejected = rec.proposals[review.current]
    rejected_centre = tuple(rejected.description["centre"])
    _press(viewer, qtbot, Qt.Key.Key_R)
    assert not layer.data[rejected_centre] and rejected.id not in rec.proposals
    skipped = review.current
    _press(viewer, qtbot, Qt.Key.Key_N)
    assert review.current != skipped and skipped in rec.proposals
    assert f"accepted 1 · rejected 1 · pending {n - 2}" in review.counts_label.text()
    assert len(review.points_layer().data) == n - 2
    qtbot.mouseClick(review.review_button, Qt.MouseButton.LeftButton)  # review off: the keys are free again
    assert not review.reviewing and layer.contour == 0 and overlay.visible and review.points_layer().visible
    _press(viewer, qtbot, Qt.Key.Key_A)
    assert len(finder.proposals()) == n - 2
    shown = layer.data != 0
    _close(widget)
    # reopen: the verdicts, the pending candidates and the pixels come back
    viewer2, w2 = _open(make_napari_viewer, qtbot, ma_image, ma_model)
    np.testing.assert_array_equal(w2.lesion_layer("MA").data != 0, shown)
    assert f"accepted 1 · rejected 1 · pending {n - 2}" in w2.ma_review.counts_label.text()
    assert len(w2.ma_review.points_layer().data) == n - 2
    # the detector again: the rejected candidate stays out, the accepted one stays the grader's
    with qtbot.waitSignal(w2.ma_finder.finished, timeout=60000):
        qtbot.mouseClick(w2.ma_finder.find_button, Qt.MouseButton.LeftButton)
    rec2 = w2.opened.annotation.record
    assert not w2.lesion_layer("MA").data[rejected_centre]
    assert all(tuple(p.description["centre"]) != rejected_centre for p in w2.ma_finder.proposals())
    assert rec2.hand("MA")[tuple(accepted_centre)] and w2.lesion_layer("MA").data[tuple(accepted_centre)]
    assert len(w2.ma_finder.proposals()) == n - 2
    _close(w2)


def test_the_click_tool_adds_a_microaneurysm_on_a_dark_dot_and_a_second_click_removes_it(
        make_napari_viewer, qtbot, ma_image, ma_model):
    viewer, widget = _open(make_napari_viewer, qtbot, ma_image, ma_model)
    review = widget.ma_review
    qtbot.mouseClick(review.click_button, Qt.MouseButton.LeftButton)
    layer = widget.lesion_layer("MA")
    assert review.click_button.isChecked() and review._on_mouse in layer.mouse_drag_callbacks
    cy, cx = DOTS[0]
    what = review.click_at(cy + 2, cx - 1)  # a little off the dot
    assert what.startswith("added")
    assert layer.data[cy, cx] and 5 <= (layer.data != 0).sum() <= 60
    assert widget.opened.annotation.record.hand("MA")[cy, cx]
    assert review.click_at(cy, cx) == "removed"
    assert not (layer.data != 0).any()
    qtbot.mouseClick(review.click_button, Qt.MouseButton.LeftButton)
    assert review._on_mouse not in layer.mouse_drag_callbacks
    _close(widget)


def test_accept_takes_the_candidates_shown_and_leaves_those_below_the_threshold_pending(
        make_napari_viewer, qtbot, ma_image, ma_model):
    viewer, widget = _open(make_napari_viewer, qtbot, ma_image, ma_model)
    finder, review = widget.ma_finder, widget.ma_review
    with qtbot.waitSignal(finder.finished, timeout=60000):
        qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    props = finder.proposals()
    peaks = sorted(float(p.prob.max()) for p in props)
    assert len(peaks) >= 3
    cut = (peaks[0] + peaks[-1]) / 2  # the slider hides the weaker candidates
    finder.threshold_slider.setValue(int(np.ceil(cut * 100)))
    hidden = [p.id for p in finder.proposals() if not p.claim().any()]
    assert hidden and len(hidden) < len(props)
    n = widget.accept_proposals("MA")
    assert n == len(props) - len(hidden)
    assert sorted(p.id for p in finder.proposals()) == sorted(hidden)  # still pending, not counted accepted
    assert f"accepted {n} · rejected 0 · pending {len(hidden)}" in review.counts_label.text()
    _close(widget)


def test_the_click_tool_leaves_clicks_to_napari_s_paint_and_erase_tools_and_switches_off_with_the_image(
        make_napari_viewer, qtbot, ma_image, ma_model):
    from types import SimpleNamespace

    viewer, widget = _open(make_napari_viewer, qtbot, ma_image, ma_model)
    review = widget.ma_review
    review.click_button.setChecked(True)
    layer = widget.lesion_layer("MA")
    press = SimpleNamespace(button=1, type="mouse_press", position=(30, 40))
    gen = review._on_mouse(layer, press)
    next(gen)  # pan/zoom: the tool waits for the release
    layer.mode = "paint"
    with pytest.raises(StopIteration):
        next(review._on_mouse(layer, press))  # painting: not the tool's click
    review.image_changed()
    assert not review.click_button.isChecked() and review._on_mouse not in layer.mouse_drag_callbacks
    _close(widget)
