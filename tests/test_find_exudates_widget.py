"""'Find exudates' in the annotator, driven as a grader would: find, threshold, erase, accept, reopen."""

import numpy as np
import pytest
import torch
from qtpy.QtCore import Qt

from conftest import EX_BLOBS, blob_mask
from napari_retina.models.folder import write_model_folder
from napari_retina.nets.segmentation import SegmentationNet
from napari_retina.widgets.annotator import LesionAnnotator


@pytest.fixture(scope="module")
def ex_model(tmp_path_factory):
    """A real (untrained, seeded) exudate segmenter in a real model folder; many small tiles."""
    torch.manual_seed(0)
    net = SegmentationNet(backbone="unet", base_channels=4, depth=2)
    with torch.no_grad():  # spread the untrained logits so that a 0.01 slider step moves pixels
        net.classifier.weight.mul_(40.0)
    cfg = {"model": "exudates", "lesion": "EX", "version": "t-ex", "net": net.config(), "input_scale": 1.0,
           "tile": 32, "overlap": 16, "threshold": 0.5, "batch": 1}
    return write_model_folder(tmp_path_factory.mktemp("ex") / "m", net.state_dict(), cfg, "t {sha256}")


@pytest.fixture
def annotator(make_napari_viewer, qtbot, flat_folder, ex_model):
    viewer = make_napari_viewer()
    viewer.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False, exudate_model_dir=ex_model)
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.opened is not None, timeout=10000)
    yield viewer, widget
    widget.flush()
    widget._timer.stop()


def _find(widget, qtbot):
    finder = widget.exudate_finder
    with qtbot.waitSignal(finder.finished, timeout=30000):
        qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    return finder


def _median_of_proposals(finder):
    vals = np.concatenate([p.prob[p.prob > 0] for p in finder.proposals()])
    return float(np.median(vals))


def test_find_fills_overlay_and_proposals_and_never_touches_hand_pixels(annotator, qtbot, monkeypatch):
    from napari_retina.widgets import segment

    monkeypatch.setattr(segment, "PREVIEW_EVERY_S", 0.0)  # every batch of tiles (a real photograph: every 0.5 s)
    viewer, widget = annotator
    hand = blob_mask(EX_BLOBS)  # IDRiD_01_EX.tif: the grader's mask
    layer = widget.lesion_layer("EX")
    np.testing.assert_array_equal(layer.data != 0, hand)
    previews = []
    widget.exudate_finder._signals.preview.connect(
        lambda pl: previews.append(int((pl[1] > 0).sum())))
    viewer.layers.selection.active = layer  # the grader works on the EX layer
    finder = _find(widget, qtbot)
    assert viewer.layers.selection.active is layer  # still: the eraser works on it at once, not on the overlay
    # the overlay filled tile by tile: more of the map with each preview
    filled = previews
    assert len(filled) > 3 and filled == sorted(filled) and filled[0] < filled[-1]
    overlay = finder.overlay_layer()
    assert overlay is not None and overlay.data.shape == layer.data.shape and overlay.data.dtype == np.uint8
    assert finder.proposals()
    # the threshold moves the candidates live: at the median about half the proposed pixels
    finder.threshold_slider.setValue(int(round(100 * _median_of_proposals(finder))))
    mid = int((layer.data != 0).sum())
    finder.threshold_slider.setValue(5)
    low = int((layer.data != 0).sum())
    finder.threshold_slider.setValue(95)
    high = int((layer.data != 0).sum())
    assert high < mid < low
    assert (layer.data[hand] != 0).all()  # the grader's pixels at every threshold
    # withdrawing every candidate leaves exactly the grader's mask
    for p in finder.proposals():
        widget.show_changes([widget.opened.annotation.record.withdraw(p.id)])
    np.testing.assert_array_equal(layer.data != 0, hand)


def test_erase_accept_and_reopen_keep_the_graders_choice(annotator, qtbot, make_napari_viewer, flat_folder, ex_model):
    viewer, widget = annotator
    finder = _find(widget, qtbot)
    finder.threshold_slider.setValue(int(round(100 * _median_of_proposals(finder))))
    layer = widget.lesion_layer("EX")
    hand = blob_mask(EX_BLOBS)
    on = np.argwhere((layer.data != 0) & ~hand)
    assert len(on) > 20
    r, c = on[len(on) // 2]
    layer.brush_size = 1
    layer.mode = "erase"
    layer.paint((r, c), 0)  # the grader rejects one candidate pixel
    widget.accept_proposals("EX")
    accepted = layer.data != 0
    assert not accepted[r, c] and accepted.sum() == len(on) - 1 + hand.sum()
    assert finder.proposals() == []
    finder.threshold_slider.setValue(5)  # accepted pixels are the grader's now: the slider leaves them
    np.testing.assert_array_equal(layer.data != 0, accepted)
    widget.flush()
    # reopen in a fresh window: the accepted pixels are there, as the grader's own
    viewer2 = make_napari_viewer()
    viewer2.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    w2 = LesionAnnotator(viewer2, preload_model=False, exudate_model_dir=ex_model)
    viewer2.window.add_dock_widget(w2)
    qtbot.waitUntil(lambda: w2.opened is not None, timeout=10000)
    np.testing.assert_array_equal(w2.lesion_layer("EX").data != 0, accepted)
    assert w2.exudate_finder.proposals() == []
    w2.flush()
    w2._timer.stop()


def test_unaccepted_candidates_survive_reopen_and_cancel_changes_nothing(annotator, qtbot, make_napari_viewer, flat_folder, ex_model):
    viewer, widget = annotator
    finder = _find(widget, qtbot)
    finder.threshold_slider.setValue(int(round(100 * _median_of_proposals(finder))))
    shown = widget.lesion_layer("EX").data != 0
    n_props = len(finder.proposals())
    widget.flush()
    viewer2 = make_napari_viewer()
    viewer2.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    w2 = LesionAnnotator(viewer2, preload_model=False, exudate_model_dir=ex_model)
    viewer2.window.add_dock_widget(w2)
    qtbot.waitUntil(lambda: w2.opened is not None, timeout=10000)
    np.testing.assert_array_equal(w2.lesion_layer("EX").data != 0, shown)
    assert len(w2.exudate_finder.proposals()) == n_props
    # the slider shows the candidates' threshold, so the first move starts from what is shown
    assert w2.exudate_finder.threshold == pytest.approx(finder.threshold)
    assert w2.exudate_finder.threshold_slider.value() == finder.threshold_slider.value()
    # a cancelled run leaves the layer as it was
    f2 = w2.exudate_finder
    before = w2.lesion_layer("EX").data.copy()
    qtbot.mouseClick(f2.find_button, Qt.MouseButton.LeftButton)
    f2.cancel()
    qtbot.waitUntil(lambda: not f2.running, timeout=30000)
    assert "cancelled" in f2.status.text()
    np.testing.assert_array_equal(w2.lesion_layer("EX").data, before)
    w2.flush()
    w2._timer.stop()


def test_no_installed_model_is_one_clear_message(make_napari_viewer, qtbot, flat_folder, tmp_path):
    viewer = make_napari_viewer()
    viewer.open(str(flat_folder / "IDRiD_01.jpg"), plugin="napari-retina")
    widget = LesionAnnotator(viewer, preload_model=False, exudate_model_dir=tmp_path / "none")
    viewer.window.add_dock_widget(widget)
    qtbot.waitUntil(lambda: widget.opened is not None, timeout=10000)
    finder = widget.exudate_finder
    qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not finder.running, timeout=10000)
    assert "no such model folder" in finder.status.text() and "\n" not in finder.status.text()
    assert finder.overlay_layer() is None
    widget.flush()
    widget._timer.stop()


def test_opening_another_image_mid_run_leaves_nothing_of_the_old_one(annotator, qtbot, flat_folder):
    viewer, widget = annotator
    finder = widget.exudate_finder
    qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    widget.open_path(flat_folder / "IDRiD_02.jpg")
    qtbot.waitUntil(lambda: not finder.running, timeout=30000)
    qtbot.waitUntil(lambda: widget.opened.stem == "IDRiD_02", timeout=30000)
    qtbot.wait(200)
    assert finder.overlay_layer() is None
    assert finder.proposals() == [] and not widget.lesion_layer("EX").data.any()


def test_candidates_appear_block_by_block_while_the_model_runs(annotator, qtbot, monkeypatch):
    import napari_retina.segmentation as segmentation

    monkeypatch.setattr(segmentation, "BLOCK", 32)  # 12 blocks on the small test image
    viewer, widget = annotator
    finder = widget.exudate_finder
    layer = widget.lesion_layer("EX")
    hand = blob_mask(EX_BLOBS)
    seen = []  # (blocks proposed, model pixels shown) after each block, as the grader sees them
    finder._signals.block.connect(lambda pl: seen.append((len(finder.proposals()), int(((layer.data != 0) & ~hand).sum()))))
    finder.threshold_slider.setValue(10)
    with qtbot.waitSignal(finder.finished, timeout=30000):
        qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    assert len(seen) == 12
    counts = [n for n, _ in seen]
    assert counts == sorted(counts) and counts[0] >= 1 and counts[0] < counts[-1]
    shown = [px for _, px in seen]
    assert shown == sorted(shown) and 0 < shown[len(shown) // 2] < shown[-1]  # on screen while the model runs
    assert len(finder.proposals()) == counts[-1]  # the end of the run adds nothing twice


def test_cancel_mid_run_withdraws_what_the_run_proposed_and_gives_back_the_earlier_candidates(annotator, qtbot, monkeypatch):
    import napari_retina.segmentation as segmentation

    monkeypatch.setattr(segmentation, "BLOCK", 32)
    viewer, widget = annotator
    finder = _find(widget, qtbot)  # a first run: its candidates are in the layer
    layer = widget.lesion_layer("EX")
    finder.threshold_slider.setValue(int(round(100 * _median_of_proposals(finder))))
    ids_before = sorted(p.id for p in finder.proposals())
    assert ids_before
    finder.threshold_slider.setValue(finder.threshold_slider.value() - 20)  # the second run would show more
    before = layer.data.copy()

    def cancel_after_some_blocks(pl):
        if len([p for p in finder.proposals() if p.id not in ids_before]) >= 3:
            finder.cancel()
    finder._signals.block.connect(cancel_after_some_blocks)
    qtbot.mouseClick(finder.find_button, Qt.MouseButton.LeftButton)
    qtbot.waitUntil(lambda: not finder.running, timeout=30000)
    assert "cancelled" in finder.status.text()
    np.testing.assert_array_equal(layer.data, before)
    assert len(finder.proposals()) == len(ids_before)
    # what is shown is what the record holds, and it is saved as such
    np.testing.assert_array_equal(layer.data != 0, widget.opened.annotation.masks["EX"])


def test_one_napari_progress_bar_follows_the_tiles_and_its_animation_turns_slower_during_the_run(
        annotator, qtbot, monkeypatch):
    import weakref

    from napari._qt.widgets.qt_progress_bar import QtLabeledProgressBar
    from qtpy.QtWidgets import QLabel

    from napari_retina.widgets import segment
    from napari_retina.widgets.activity import ACTIVITY_SPEED_PERCENT

    monkeypatch.setattr(segment, "PROGRESS_EVERY_S", 0.0)
    viewer, widget = annotator
    finder = widget.exudate_finder
    window = weakref.ref(widget.window())  # a slot holding the window would outlive the viewer

    def speeds():
        return [lab.movie().speed() for lab in window().findChildren(QLabel) if lab.movie() is not None]

    def bars():  # napari's bars of this run: (value, maximum)
        return [(b.qt_progress_bar.value(), b.qt_progress_bar.maximum()) for b in window().findChildren(QtLabeledProgressBar)
                if "exudates" in b.description_label.text()]

    before = speeds()
    assert before and max(before) > ACTIVITY_SPEED_PERCENT  # napari's "in progress" animation
    during = []
    def look(done, total):
        during.append((done, total, speeds(), bars()))

    finder._signals.tile.connect(look)  # after the finder's own slot
    _find(widget, qtbot)
    finder._signals.tile.disconnect(look)
    assert len(during) > 3
    for done, total, sp, shown in during:
        assert max(sp) <= ACTIVITY_SPEED_PERCENT
        assert shown == [(done, total)]  # one bar, at the tile just done
    qtbot.waitUntil(lambda: not finder.running, timeout=5000)
    assert speeds() == before


def test_the_runs_last_word_stays_in_the_status_line_when_the_gui_lags_behind_the_tiles(annotator, qtbot):
    import time

    viewer, widget = annotator
    finder = widget.exudate_finder

    def lag(done, total):  # a GUI thread busy elsewhere: the run's end arrives while a tile is shown
        if done < total:
            time.sleep(0.05)

    finder._signals.tile.connect(lag)
    _find(widget, qtbot)
    qtbot.waitUntil(lambda: not finder.running, timeout=5000)
    qtbot.wait(100)
    finder._signals.tile.disconnect(lag)
    assert "blocks with candidates" in finder.status.text(), finder.status.text()
    assert finder._pbar is None


def test_overlapping_runs_keep_napari_animation_slow_until_the_last_one_ends(annotator):
    import weakref

    from qtpy.QtWidgets import QLabel

    from napari_retina.widgets.activity import ACTIVITY_SPEED_PERCENT, SlowAnimations

    viewer, widget = annotator
    window = weakref.ref(widget.window())

    def speed():
        return max(lab.movie().speed() for lab in window().findChildren(QLabel) if lab.movie() is not None)

    before = speed()
    first, second = SlowAnimations(widget), SlowAnimations(widget)  # a widget docked in the window
    assert speed() == ACTIVITY_SPEED_PERCENT < before
    first.release()
    first.release()  # twice: no effect
    assert speed() == ACTIVITY_SPEED_PERCENT  # the second run still goes on
    second.release()
    assert speed() == before


def test_a_run_has_every_core_and_gives_torch_back_its_setting(annotator, qtbot, ex_model, monkeypatch):
    import os

    from napari_retina.models.registry import load_model

    viewer, widget = annotator
    finder = widget.exudate_finder
    seg = load_model(ex_model)
    seen = []
    segment = seg.segment
    monkeypatch.setattr(seg, "segment", lambda *a, **k: (seen.append(torch.get_num_threads()), segment(*a, **k))[1])
    finder.segmenter = seg
    before = torch.get_num_threads()
    torch.set_num_threads(1)  # as the ellipse refiner leaves it (half of 2 cores)
    try:
        _find(widget, qtbot)
        assert seen == [os.cpu_count()]
        assert torch.get_num_threads() == 1
    finally:
        torch.set_num_threads(before)
