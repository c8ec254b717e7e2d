"""npe2 reader, writer and sample entry points, called as napari calls them."""

import numpy as np
import pytest
from PIL import Image

from conftest import EX_BLOBS, HE_BLOBS, blob_mask, fundus_rgb, write_rgba_mask
from napari_retina import _npe2
from napari_retina.io.masks import read_mask
from napari_retina.lesions import LESIONS

LAYER_NAMES = [l.layer_name for l in LESIONS]


@pytest.fixture
def notes(monkeypatch):
    seen = []
    monkeypatch.setattr(_npe2, "notify_error", seen.append)
    return seen


def _read(path):
    reader = _npe2.get_reader(str(path))
    assert reader is not None, f"no reader for {path}"
    return reader(str(path))


def _by_name(layers):
    return {kw["name"]: (data, kw, kind) for data, kw, kind in layers}


def test_flat_folder_opens_first_image_with_one_labels_layer_per_lesion(flat_folder, notes):
    layers = _by_name(_read(flat_folder))
    assert layers["IDRiD_01"][2] == "image" and layers["IDRiD_01"][0].shape == (96, 128, 3)
    for name in LAYER_NAMES:
        assert layers[name][2] == "labels"
    ex = layers["EX hard exudates"][0]
    np.testing.assert_array_equal(ex != 0, blob_mask(EX_BLOBS))
    assert set(np.unique(ex)) == {0, 1}  # EX's label value
    np.testing.assert_array_equal(layers["HE haemorrhages"][0] != 0, blob_mask(HE_BLOBS))
    assert not layers["MA microaneurysms"][0].any()
    assert layers["ellipses"][2] == "shapes"
    meta = layers["IDRiD_01"][1]["metadata"]["napari_retina"]
    assert meta["dataset"] == str(flat_folder)
    assert notes == []


def test_official_layout_folder_opens_with_masks_of_both_forms(idrid_folder, notes):
    layers = _by_name(_read(idrid_folder))
    np.testing.assert_array_equal(layers["EX hard exudates"][0] != 0, blob_mask(EX_BLOBS))
    # the testing split's RGBA mask opens as its image
    img = idrid_folder / "1. Original Images" / "b. Testing Set" / "IDRiD_55.jpg"
    layers55 = _by_name(_read(img))
    np.testing.assert_array_equal(layers55["EX hard exudates"][0] != 0, blob_mask(HE_BLOBS))
    assert notes == []


def test_reader_declines_what_is_not_its_kind(tmp_path):
    (tmp_path / "notes.txt").write_text("hello")
    assert _npe2.get_reader(str(tmp_path / "notes.txt")) is None
    assert _npe2.get_reader(str(tmp_path / "volume.nii")) is None
    empty = tmp_path / "empty"
    empty.mkdir()
    assert _npe2.get_reader(str(empty)) is None
    assert _npe2.get_reader([str(tmp_path / "a.jpg"), str(tmp_path / "b.jpg")]) is None


@pytest.mark.parametrize(
    "content, expect",
    [(b"this is not a picture", "IDRiD_77.jpg"), ("truncate", "IDRiD_77.jpg")],
)
def test_broken_image_gives_one_notification_and_no_layer(tmp_path, notes, content, expect):
    p = tmp_path / "IDRiD_77.jpg"
    if content == "truncate":
        Image.fromarray(fundus_rgb(1)).save(p, quality=95)
        p.write_bytes(p.read_bytes()[: p.stat().st_size // 2])
    else:
        p.write_bytes(content)
    assert _read(p) == [(None,)]
    assert len(notes) == 1 and expect in notes[0] and "\n" not in notes[0]


def test_mask_of_the_wrong_size_is_left_out_with_one_notification(flat_folder, notes):
    Image.fromarray(np.zeros((10, 12), np.uint8)).save(flat_folder / "IDRiD_02_MA.tif")
    write_rgba_mask(flat_folder / "IDRiD_02_SE.tif", blob_mask([(40, 40)]))
    layers = _by_name(_read(flat_folder / "IDRiD_02.jpg"))
    assert layers["IDRiD_02"][0].shape == (96, 128, 3)  # the image opens
    assert not layers["MA microaneurysms"][0].any()  # the bad mask is left out...
    np.testing.assert_array_equal(layers["SE soft exudates"][0] != 0, blob_mask([(40, 40)]))  # ...the good one is not
    assert len(notes) == 1 and "IDRiD_02_MA.tif" in notes[0] and "12x10" in notes[0] and "\n" not in notes[0]
    # the annotator learns which file it must not overwrite
    assert set(layers["IDRiD_02"][1]["metadata"]["napari_retina"]["unreadable"]) == {"MA"}


def test_a_folder_whose_first_image_has_a_bad_mask_still_opens(tmp_path, notes):
    d = tmp_path / "flat"
    d.mkdir()
    for stem in ("IDRiD_22", "IDRiD_23"):
        Image.fromarray(fundus_rgb(2)).save(d / f"{stem}.jpg", quality=95)
    Image.fromarray(np.zeros((100, 100), np.uint8)).save(d / "IDRiD_22_EX.tif")
    layers = _by_name(_read(d))
    assert layers["IDRiD_22"][2] == "image" and not layers["EX hard exudates"][0].any()
    assert len(notes) == 1 and "IDRiD_22_EX.tif" in notes[0]


def test_a_mask_file_opens_as_labels(tmp_path, notes):
    m = blob_mask([(10, 10)])
    write_rgba_mask(tmp_path / "eye_SE.tif", m)
    [(data, kw, kind)] = _read(tmp_path / "eye_SE.tif")
    assert kind == "labels" and kw["name"] == "eye SE soft exudates"
    np.testing.assert_array_equal(data != 0, m)


def test_a_probability_map_opens_as_an_overlay_not_as_a_fundus_image(tmp_path, notes):
    prob = np.arange(60 * 80, dtype=np.uint32).reshape(60, 80) % 256
    Image.fromarray(prob.astype(np.uint8)).save(tmp_path / "eye_EX_prob.tif")
    [(data, kw, kind)] = _read(tmp_path / "eye_EX_prob.tif")
    assert kind == "image" and kw["name"] == "eye EX probability" and kw["contrast_limits"] == (0, 255)
    np.testing.assert_array_equal(data, prob)
    Image.fromarray(np.zeros((5, 5, 3), np.uint8)).save(tmp_path / "eye_MA_prob.png")
    assert _read(tmp_path / "eye_MA_prob.png") == _npe2.NULL_LAYER
    assert len(notes) == 1 and "eye_MA_prob.png" in notes[0] and "one channel" in notes[0]
    assert notes == [n for n in notes if "\n" not in n]


@pytest.mark.parametrize("ext", [".tif", ".png"])
def test_writer_saves_a_labels_layer_as_a_binary_mask(tmp_path, ext):
    data = np.zeros((40, 50), np.uint8)
    data[5:9, 7:20] = 3
    [out] = _npe2.write_labels(str(tmp_path / f"x_MA{ext}"), data, {})
    np.testing.assert_array_equal(read_mask(out), data != 0)
    with Image.open(out) as im:
        assert im.mode == "P"


@pytest.mark.parametrize("meta", [
    {"name": "MA microaneurysms", "metadata": {}},
    {"name": "renamed", "metadata": {"napari_retina": {"role": "lesion", "lesion": "MA"}}},
])
def test_writer_saves_a_lesion_layers_confirmed_pixels_only(tmp_path, meta):
    from napari_retina.lesions import lesion

    ma = lesion("MA")
    data = np.zeros((6, 8), np.uint8)
    data[1, 1:4] = ma.label  # confirmed
    data[4, 2:6] = ma.pending_label  # a model's pending proposal
    [out] = _npe2.write_labels(str(tmp_path / "x_MA.tif"), data, meta)
    np.testing.assert_array_equal(read_mask(out), data == ma.label)
    # a Labels layer that is not a lesion layer keeps every labelled pixel
    [other] = _npe2.write_labels(str(tmp_path / "cells.tif"), data, {"name": "cells", "metadata": {}})
    np.testing.assert_array_equal(read_mask(other), data != 0)


def test_writer_reports_an_unwritable_place(tmp_path, notes):
    blocker = tmp_path / "file"
    blocker.write_text("x")
    assert _npe2.write_labels(str(blocker / "m.tif"), np.zeros((4, 4), np.uint8), {}) == []
    assert len(notes) == 1


@pytest.mark.parametrize("name, shape", [("sample_idrid", (2848, 4288, 3)), ("sample_retina", None), ("sample_microaneurysms", None)])
def test_samples_open_with_lesion_layers(name, shape, tmp_path, monkeypatch):
    monkeypatch.setattr(_npe2, "samples_dir", lambda: tmp_path)
    layers = _by_name(getattr(_npe2, name)())
    images = [v for v in layers.values() if v[2] == "image"]
    assert len(images) == 1 and images[0][0].ndim == 3 and images[0][0].shape[2] == 3
    if shape:
        assert images[0][0].shape == shape
        # the real IDRiD sample ships with its five lesion masks
        for lname in LAYER_NAMES:
            assert layers[lname][0].any(), lname
    for lname in LAYER_NAMES:
        assert layers[lname][2] == "labels"
