"""The headless annotation session: navigation, model versions in use, the fundus check, ellipses
as data and the autosave's timing (no napari: what every dock and command binds to)."""

from __future__ import annotations

import numpy as np
import pytest
from PIL import Image

from conftest import fundus_rgb
from napari_retina.io.datasets import open_dataset
from napari_retina.io.ellipses import Ellipse, ellipse_to_corners
from napari_retina.models.registry import ModelFolderError, shipped_model_dir
from napari_retina.session import (
    SAVE_AT_LATEST_S,
    SAVE_WHEN_QUIET_S,
    AnnotationSession,
    ProjectAutosave,
    looks_like_fundus,
    open_record,
)


def _session(folder, index=0):
    ds = open_dataset(folder)
    s = AnnotationSession()
    s.set_opened(open_record(ds.records[index], dataset=ds), ds, index)
    return s


def test_navigation_steps_through_the_folder_and_stops_at_its_ends(flat_folder):
    s = _session(flat_folder)
    assert s.image_names() == ["IDRiD_01.jpg", "IDRiD_02.jpg"] and s.data_folder == flat_folder
    assert s.neighbour(-1) is None and s.neighbour(+1) == 1
    s.index = 1
    assert s.neighbour(+1) is None and s.neighbour(-1) == 0
    alone = AnnotationSession()
    assert alone.neighbour(+1) is None and alone.image_names() == [] and alone.data_folder is None


def test_listeners_hear_the_image_and_each_model_version_put_in_use(flat_folder, tmp_path):
    s = AnnotationSession()
    heard = []
    s.connect("image", lambda op: heard.append(("image", op.record.image.name)))
    s.connect("model", lambda kind, folder: heard.append(("model", kind, folder)))
    ds = open_dataset(flat_folder)
    s.set_opened(open_record(ds.records[1], dataset=ds), ds, 1)
    assert heard == [("image", "IDRiD_02.jpg")]
    assert s.model_dir("refiner") == shipped_model_dir("refiner")
    s.pin_model("refiner", tmp_path / "mine")
    assert s.model_dir("refiner") == tmp_path / "mine" and heard[-1] == ("model", "refiner", tmp_path / "mine")
    with pytest.raises(ModelFolderError):  # a folder the registry refuses is never put in use
        s.use_model("refiner", tmp_path / "nothing here")
    assert s.model_dir("refiner") == tmp_path / "mine"
    s.pin_model("refiner", None)
    assert s.model_dir("refiner") == shipped_model_dir("refiner")
    with pytest.raises(ValueError, match="unknown session event"):
        s.connect("nothing", print)


def test_a_photograph_without_a_round_field_of_view_is_noticed_once_and_needs_the_graders_word(tmp_path):
    from napari_retina.fundus import field_of_view_mask

    rng = np.random.default_rng(0)
    noise = rng.integers(0, 255, (96, 128, 3), dtype=np.uint8)
    assert looks_like_fundus(field_of_view_mask(fundus_rgb(1))) is True
    assert looks_like_fundus(field_of_view_mask(noise)) is False
    assert looks_like_fundus(np.ones((50, 80), bool)) is False  # no dark surround at all
    Image.fromarray(noise).save(tmp_path / "noise.png")
    ds = open_dataset(tmp_path)
    s = AnnotationSession()
    op = open_record(ds.records[0], dataset=ds)
    assert s.fundus_confirmed(op) and not s.first_notice(op)  # not known yet: nothing said
    op.fundus = False
    assert not s.fundus_confirmed(op)
    assert s.first_notice(op) and not s.first_notice(op)  # said once per image
    s.confirm_fundus(op)
    assert s.fundus_confirmed(op)


def test_the_ellipses_as_data_follow_their_editor_and_keep_each_ellipses_extras(flat_folder):
    s = _session(flat_folder, 1)
    e1, e2 = Ellipse("EX", (40.0, 30.0), (10.0, 6.0), 20.0), Ellipse("HE", (80.0, 50.0), (5.0, 5.0), 0.0)
    s.ellipse_extras["a1"] = {"author": "kim"}
    ef = s.update_ellipses([ellipse_to_corners(e1), ellipse_to_corners(e2)], ["ellipse", "rectangle"], ["EX", "HE"],
                           ["a1", "b2"])
    assert s.ellipses is ef is s.opened.annotation.ellipses  # what autosave writes
    assert [e.lesion for e in ef.ellipses] == ["EX"]  # only ellipses are ellipses
    got = s.current_ellipses()["a1"]
    assert got.extra["author"] == "kim" and got.center_xy == pytest.approx((40.0, 30.0), abs=1e-6)
    assert got.semi_axes == pytest.approx((10.0, 6.0), abs=1e-6)
    assert s.update_ellipses([], [], [], []).ellipses == [] and s.current_ellipses() == {}


def test_autosave_is_due_once_a_burst_pauses_or_at_the_latest_after_its_first_edit(flat_folder):
    s = _session(flat_folder, 1)
    auto = ProjectAutosave(on_done=lambda *r: None)
    auto.begin(s.opened, [], grader="test")
    assert auto.due(s.opened, 100.0) is None  # nothing changed
    auto.edited(now=100.0)
    s.opened.annotation.record.hand_edit("EX", (10, 12, 10, 12), painted=np.ones((2, 2), bool))
    assert auto.due(s.opened, 100.0 + SAVE_WHEN_QUIET_S / 2) is None  # still painting
    assert auto.due(s.opened, 100.0 + SAVE_WHEN_QUIET_S) == "save"  # the burst paused
    for t in np.arange(100.0, 100.0 + SAVE_AT_LATEST_S, 0.1):  # a stroke that never pauses...
        auto.edited(now=float(t))
    assert auto.due(s.opened, 100.0 + SAVE_AT_LATEST_S) == "save"  # ...is saved at the latest anyway
    assert auto.has_unsaved_changes(s.opened) and not auto.has_unsaved_changes(None)
