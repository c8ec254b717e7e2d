import csv
import json

import numpy as np
import pytest
from PIL import Image

from conftest import EX_BLOBS, HE_BLOBS, blob_mask, fundus_rgb
from napari_retina.io.ellipses import Ellipse, EllipseFile
from napari_retina.io.errors import RetinaInputError
from napari_retina.io.images import sha256_file
from napari_retina.io.masks import read_mask
from napari_retina.io.project import SOURCE_HAND, Annotation, ProjectFolder, default_project_dir


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "eye.jpg"
    Image.fromarray(fundus_rgb(3)).save(p, quality=92)
    return p


def _annotation(shape):
    ann = Annotation.empty("eye.jpg", shape)
    ann.masks["EX"] = blob_mask(EX_BLOBS)
    ann.masks["HE"] = blob_mask(HE_BLOBS, radius=5)
    ann.ellipses = EllipseFile(
        image="eye.jpg",
        ellipses=[Ellipse("EX", (40.0, 30.0), (6.0, 3.0), 30.0, {"id": "a1", "author": "kim", "note": "keep"})],
        extra={"reviewed": False},
    )
    return ann


def test_default_project_dir(tmp_path):
    assert default_project_dir(tmp_path / "a" / "IDRiD_55.jpg") == tmp_path / "a" / "IDRiD_55.retina"
    assert default_project_dir(tmp_path / "a" / "x.png", root=tmp_path / "p") == tmp_path / "p" / "x.retina"


def test_save_and_load_round_trip(tmp_path, image):
    proj = ProjectFolder.create(default_project_dir(image), image, grader="kim")
    rgb = fundus_rgb(3)
    ann = _annotation(rgb.shape[:2])
    proj.save(ann, rgb=rgb, fov_area_px=4000, grader="kim")

    files = {p.name for p in proj.path.iterdir()}
    assert {"eye.jpg", "ellipses.json", "provenance.json", "overlay.png", "lesions.csv"} <= files
    assert {f"eye_{c}.tif" for c in ("EX", "HE", "MA", "SE", "OD")} <= files
    assert not [f for f in files if f.endswith(".tmp")]
    # the image is copied byte for byte
    assert (proj.path / "eye.jpg").read_bytes() == image.read_bytes()
    # masks are 1-bit palette TIFFs (IDRiD convention)
    with Image.open(proj.path / "eye_EX.tif") as im:
        assert im.mode == "P" and im.tag_v2[258] in (1, (1,))

    back = ProjectFolder(proj.path).load()
    assert back.shape == rgb.shape[:2]
    for code in ("EX", "HE", "MA"):
        np.testing.assert_array_equal(back.masks[code], ann.masks[code])
    e = back.ellipses.ellipses[0]
    assert e.lesion == "EX" and e.center_xy == (40.0, 30.0) and e.extra["note"] == "keep"
    assert back.ellipses.extra == {"reviewed": False}

    prov = json.loads((proj.path / "provenance.json").read_text())
    assert prov["grader"] == "kim"
    assert prov["image_sha256"] == sha256_file(image)
    assert prov["tool"] == "napari-retina" and prov["tool_version"]
    assert prov["created"] <= prov["modified"]

    rows = list(csv.DictReader((proj.path / "lesions.csv").open()))
    by = {r["lesion"]: r for r in rows}
    assert [r["lesion"] for r in rows] == ["EX", "HE", "MA", "SE", "OD"]
    assert int(by["EX"]["count"]) == 2 and int(by["HE"]["count"]) == 1 and int(by["MA"]["count"]) == 0
    ex_area = int(ann.masks["EX"].sum())
    assert int(by["EX"]["area_px"]) == ex_area
    assert float(by["EX"]["area_pct_fov"]) == pytest.approx(100 * ex_area / 4000, abs=1e-4)


def test_model_pixels_are_removed_but_hand_pixels_stay_after_reopen(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "p.retina", image)
    ann = Annotation.empty("eye.jpg", (96, 128))
    hand = blob_mask([(30, 30)], radius=4)
    ann.masks["EX"] = hand.copy()
    model = blob_mask([(30, 36)], radius=4)  # overlaps the hand stroke
    sid = ann.add_source({"kind": "model", "model": "refiner", "ellipse_id": "e1"})
    ann.add_model_pixels("EX", model, sid)
    assert (ann.masks["EX"] == (hand | model)).all()
    proj.save(ann)

    back = ProjectFolder(proj.path).load()
    assert back.source_table[sid]["ellipse_id"] == "e1"
    removed = back.remove_source("EX", sid)
    assert removed == int((model & ~hand).sum())
    np.testing.assert_array_equal(back.masks["EX"], hand)
    assert back.source_table[SOURCE_HAND] == {"kind": "hand"}


def test_brush_over_model_pixels_makes_them_hand_pixels():
    ann = Annotation.empty("x.jpg", (20, 20))
    model = np.zeros((20, 20), bool)
    model[5:10, 5:10] = True
    sid = ann.add_source({"kind": "model"})
    ann.add_model_pixels("MA", model, sid)
    stroke = np.zeros_like(model)
    stroke[5:7, 5:10] = True
    ann.mark_hand("MA", stroke)
    ann.remove_source("MA", sid)
    np.testing.assert_array_equal(ann.masks["MA"], stroke)


def test_unwritable_project_folder_is_one_clear_error(tmp_path, image):
    blocker = tmp_path / "file"
    blocker.write_text("not a folder")
    with pytest.raises(RetinaInputError, match="cannot"):
        ProjectFolder.create(blocker / "eye.retina", image)


def test_mask_of_the_wrong_size_is_refused_on_load(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    Image.fromarray(np.zeros((10, 10), np.uint8)).save(proj.path / "eye_EX.tif")
    with pytest.raises(RetinaInputError, match="eye_EX.tif"):
        proj.load()


def test_saving_only_changed_lesions_keeps_the_others(tmp_path, image):
    proj = ProjectFolder.create(tmp_path / "eye.retina", image)
    ann = _annotation((96, 128))
    proj.save(ann)
    before = (proj.path / "eye_HE.tif").stat().st_mtime_ns
    ann.masks["EX"][:] = False
    proj.save(ann, lesions={"EX"})
    assert (proj.path / "eye_HE.tif").stat().st_mtime_ns == before
    assert not read_mask(proj.path / "eye_EX.tif").any()
