"""Ellipse refinement in the annotator: draw -> pixels inside; delete -> gone, hand strokes stay."""

import json

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from napari_retina.io.ellipses import Ellipse, EllipseFile, ellipse_to_corners, rasterize_ellipse, save_ellipses
from napari_retina.models.folder import write_model_folder
from napari_retina.nets.refiner import RefinerNet
from napari_retina.widgets.annotator import LesionAnnotator


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    """A real (untrained, seeded) refinement network in a real model folder."""
    torch.manual_seed(0)
    net = RefinerNet(base_channels=8, fused_channels=16)
    folder = tmp_path_factory.mktemp("model")
    cfg = {"model": "refiner", "net": net.config(), "geometry": {"size": 128}, "threshold": 0.5, "version": "test-0"}
    return write_model_folder(folder, net.state_dict(), cfg, "test model {sha256}")


@pytest.fixture
def annotator(make_napari_viewer, qtbot, flat_folder, model_dir):
    viewer = make_napari_viewer()
    viewer.open(str(flat_folder / "IDRiD_02.jpg"), plugin="napari-retina")
    widget = LesionAnnotator(viewer, model_dir=model_dir)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.refinement.refiner is not None, timeout=20000)
    yield viewer, widget
    widget.flush()
    widget._timer.stop()


def _draw(widget, e):
    widget.set_lesion(e.lesion, activate=False)
    widget.ellipses_layer.add(ellipse_to_corners(e), shape_type="ellipse")


def test_drawn_ellipse_is_refined_inside_it_and_delete_keeps_hand_pixels(annotator, qtbot, flat_folder):
    viewer, widget = annotator
    e = Ellipse("HE", (60.0, 45.0), (14.0, 8.0), 20.0)
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        _draw(widget, e)
    layer = widget.lesion_layer("HE")
    inside = rasterize_ellipse(e, layer.data.shape)
    got = layer.data != 0
    assert got.any() and not (got & ~inside).any()
    # a hand stroke beside the ellipse
    layer.brush_size = 3
    layer.paint((45, 90), 2)
    hand = (layer.data != 0) & ~inside
    assert hand.sum() > 0
    # delete the ellipse: its pixels go, the stroke stays
    shapes = widget.ellipses_layer
    shapes.selected_data = {0}
    shapes.remove_selected()
    assert not (layer.data[inside] != 0).any()
    np.testing.assert_array_equal((layer.data != 0), hand)


def test_each_drawn_ellipse_gets_its_own_id_and_keeps_its_pixels(annotator, qtbot):
    viewer, widget = annotator
    first = Ellipse("EX", (40.0, 40.0), (10.0, 7.0), 0.0)
    second = Ellipse("EX", (90.0, 70.0), (10.0, 7.0), 30.0)
    for e in (first, second):
        with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
            _draw(widget, e)
    ids = list(widget.ellipses_layer.features["id"])
    assert len(set(ids)) == 2 and all(ids)
    record = widget.opened.annotation.record
    assert {p.description["ellipse_id"] for p in record.find(model="refiner")} == set(ids)
    layer = widget.lesion_layer("EX")
    # the second ellipse adds pixels; it never takes away the first one's
    for e in (first, second):
        assert (layer.data[rasterize_ellipse(e, layer.data.shape)] != 0).any()


def test_hand_pixels_survive_deleting_an_ellipse_after_reopening(annotator, qtbot, flat_folder, make_napari_viewer, model_dir):
    viewer, widget = annotator
    e = Ellipse("EX", (40.0, 50.0), (12.0, 9.0), 0.0)
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        _draw(widget, e)
    layer = widget.lesion_layer("EX")
    inside = rasterize_ellipse(e, layer.data.shape)
    model_px = (layer.data != 0) & inside
    assert model_px.any()
    # a stroke of single pixels across the ellipse's edge: inside ones were model pixels before
    layer.brush_size = 1
    stroke = np.zeros_like(inside)
    for c in range(44, 66, 3):
        layer.paint((50, c), 1)
        stroke[50, c] = True
    assert (layer.data[stroke] == 1).all() and (stroke & model_px).any() and (stroke & ~inside).any()
    widget.flush()
    proj = flat_folder / "IDRiD_02.retina"
    table = json.loads((proj / "proposals.json").read_text())
    assert [p["description"]["ellipse_id"] for p in table["proposals"]] == list(widget.ellipses_layer.features["id"])

    viewer2 = make_napari_viewer()
    viewer2.open(str(flat_folder / "IDRiD_02.jpg"), plugin="napari-retina")
    w2 = LesionAnnotator(viewer2, model_dir=model_dir)
    layer2 = w2.lesion_layer("EX")
    assert (layer2.data != 0).sum() == (layer.data != 0).sum()
    shapes = w2.ellipses_layer
    shapes.selected_data = {0}
    shapes.remove_selected()
    left = layer2.data != 0
    # the brush claims the pixels it changes: outside the proposal, and the pending (lighter)
    # proposal pixels it painted over, which painting confirms
    changed = stroke
    assert left[changed].all() and changed.any()
    assert not (left & inside & ~changed).any()
    w2.flush()
    w2._timer.stop()


def test_threshold_slider_previews_live_and_refine_all_handles_imported_ellipses(annotator, qtbot, tmp_path):
    viewer, widget = annotator
    ef = EllipseFile("IDRiD_02.jpg", [Ellipse("SE", (70.0, 30.0), (10.0, 7.0), 45.0, {"id": "f1", "author": "kim"})], {})
    save_ellipses(tmp_path / "e.json", ef)
    assert widget.import_ellipses(tmp_path / "e.json") == 1
    layer = widget.lesion_layer("SE")
    assert not layer.data.any()  # imported, not yet refined
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        qtbot.mouseClick(widget.refine_all_button, Qt.MouseButton.LeftButton)
    n_mid = int((layer.data != 0).sum())
    assert n_mid > 0
    widget.threshold_slider.setValue(95)
    n_high = int((layer.data != 0).sum())
    widget.threshold_slider.setValue(5)
    n_low = int((layer.data != 0).sum())
    assert n_low >= n_mid >= n_high
    assert widget.current_ellipses()["f1"].extra.get("author") == "kim"


def test_accepted_proposals_stay_when_the_ellipse_goes(annotator, qtbot):
    viewer, widget = annotator
    e = Ellipse("MA", (30.0, 60.0), (9.0, 6.0), 0.0)
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        _draw(widget, e)
    widget.set_lesion("MA")
    layer = widget.lesion_layer("MA")
    before = layer.data != 0
    assert before.any()
    qtbot.mouseClick(widget.accept_button, Qt.MouseButton.LeftButton)
    shapes = widget.ellipses_layer
    shapes.selected_data = {0}
    shapes.remove_selected()
    np.testing.assert_array_equal(layer.data != 0, before)


def _claims(widget, eid):
    """The pixels the record says ellipse `eid`'s proposal claims, full size."""
    [p] = widget.opened.annotation.record.find(ellipse_id=eid)
    out = np.zeros(widget.opened.annotation.shape, bool)
    out[p.slices] = p.claim()
    return out


def _ids(widget):
    return list(widget.ellipses_layer.features["id"])


def _delete(widget, index):
    shapes = widget.ellipses_layer
    shapes.selected_data = {index}
    shapes.remove_selected()


def test_overlapping_ellipses_of_one_lesion_keep_each_others_pixels(annotator, qtbot):
    viewer, widget = annotator
    widget.threshold_slider.setValue(20)  # enough pixels from the untrained net to overlap
    a = Ellipse("EX", (55.0, 45.0), (16.0, 10.0), 0.0)
    b = Ellipse("EX", (68.0, 45.0), (16.0, 10.0), 0.0)
    for e in (a, b):
        with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
            _draw(widget, e)
    ida, idb = _ids(widget)
    layer = widget.lesion_layer("EX")
    ca, cb = _claims(widget, ida), _claims(widget, idb)
    assert (ca & cb).any(), "the test needs overlapping proposals"
    np.testing.assert_array_equal(layer.data != 0, ca | cb)
    _delete(widget, 0)  # ellipse a
    np.testing.assert_array_equal(layer.data != 0, cb)
    # moving b (the layer's data changes in place, as a drag does): its old pixels go, the new place gets some
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        widget.ellipses_layer.data = [ellipse_to_corners(Ellipse("EX", (68.0, 75.0), (16.0, 10.0), 0.0))]
    assert _ids(widget) == [idb]
    np.testing.assert_array_equal(layer.data != 0, _claims(widget, idb))
    assert layer.data.any() and not (layer.data[30:60, :] != 0).any()


def test_overlapping_ellipses_of_two_lesions_are_independent(annotator, qtbot):
    viewer, widget = annotator
    widget.threshold_slider.setValue(20)
    ex = Ellipse("EX", (60.0, 45.0), (16.0, 10.0), 0.0)
    he = Ellipse("HE", (64.0, 45.0), (16.0, 10.0), 0.0)
    for e in (ex, he):
        with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
            _draw(widget, e)
    id_ex, id_he = _ids(widget)
    he_layer, ex_layer = widget.lesion_layer("HE"), widget.lesion_layer("EX")
    he_before = he_layer.data.copy()
    assert ((ex_layer.data != 0) & (he_before != 0)).any()
    _delete(widget, 0)
    assert not ex_layer.data.any()
    np.testing.assert_array_equal(he_layer.data, he_before)


def test_erased_pixels_stay_erased_when_the_threshold_moves(annotator, qtbot):
    viewer, widget = annotator
    widget.threshold_slider.setValue(30)
    e = Ellipse("SE", (60.0, 48.0), (18.0, 12.0), 0.0)
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        _draw(widget, e)
    # start where the (untrained) net claims about half its pixels, so a lower threshold adds some
    [p] = widget.opened.annotation.record.find(ellipse_id=_ids(widget)[0])
    widget.threshold_slider.setValue(int(np.clip(round(100 * np.median(p.prob[p.prob > 0])), 10, 90)))
    layer = widget.lesion_layer("SE")
    on = np.argwhere(layer.data != 0)
    assert len(on) > 10
    r, c = on[len(on) // 2]
    layer.brush_size = 1
    layer.mode = "erase"
    layer.paint((r, c), 0)
    assert layer.data[r, c] == 0
    for value in (5, 95, 5):
        widget.threshold_slider.setValue(value)
        assert layer.data[r, c] == 0, f"the erased pixel came back at threshold {value / 100}"
    assert (layer.data != 0).sum() > len(on)  # the low threshold did add pixels elsewhere


def test_only_the_changed_box_is_redrawn_and_the_canvas_shows_it(make_napari_viewer, qtbot, flat_folder, model_dir):
    viewer = make_napari_viewer(show=True)
    viewer.open(str(flat_folder / "IDRiD_02.jpg"), plugin="napari-retina")
    widget = LesionAnnotator(viewer, model_dir=model_dir)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.refinement.refiner is not None, timeout=20000)
    widget.threshold_slider.setValue(10)
    widget.ellipses_layer.visible = False  # the canvas then shows only the image and the masks
    layer = widget.lesion_layer("HE")
    refreshed = []
    layer.events.set_data.connect(lambda e: refreshed.append(e))  # a whole-layer refresh emits this
    updates = []
    layer.events.labels_update.connect(lambda e: updates.append((e.offset, e.data.shape)))
    qtbot.wait(200)
    before = viewer.screenshot(canvas_only=True, flash=False)
    e = Ellipse("HE", (64.0, 48.0), (14.0, 9.0), 0.0)
    with qtbot.waitSignal(widget.refinement.refined, timeout=10000):
        _draw(widget, e)
    qtbot.wait(200)
    shown = viewer.screenshot(canvas_only=True, flash=False)
    assert (layer.data != 0).any() and not np.array_equal(shown, before)
    assert refreshed == []
    (r0, c0), (h, w) = updates[-1]
    rows, cols = np.nonzero(layer.data)
    assert (r0, c0) == (rows.min(), cols.min()) and (h, w) == (rows.max() - r0 + 1, cols.max() - c0 + 1)
    _delete(widget, 0)
    qtbot.wait(200)
    np.testing.assert_array_equal(viewer.screenshot(canvas_only=True, flash=False), before)
    widget.flush()
    widget._timer.stop()
