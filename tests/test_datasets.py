import numpy as np
from pathlib import Path

from napari_retina.io.datasets import is_project_folder, open_dataset, parse_mask_name, parse_prob_name


def test_parse_mask_name():
    assert parse_mask_name("IDRiD_01_EX.tif") == ("IDRiD_01", "EX")
    assert parse_mask_name("img_7_ma.TIFF") == ("img_7", "MA")
    assert parse_mask_name("IDRiD_01.jpg") is None
    assert parse_mask_name("IDRiD_01_XX.tif") is None


def test_probability_maps_are_never_listed_as_fundus_images(flat_folder):
    from PIL import Image

    assert parse_prob_name("IDRiD_01_EX_prob.tif") == ("IDRiD_01", "EX")
    assert parse_prob_name("IDRiD_01_EX.tif") is None and parse_mask_name("IDRiD_01_EX_prob.tif") is None
    # what `segment --out` writes beside the images of a folder
    for name in ("IDRiD_01_EX_prob.tif", "IDRiD_02_MA_prob.tif", "IDRiD_02_EX_prob.png"):
        Image.fromarray(np.full((40, 50), 128, np.uint8)).save(flat_folder / name)
    ds = open_dataset(flat_folder)
    assert [r.image.name for r in ds.records] == ["IDRiD_01.jpg", "IDRiD_02.jpg"]
    assert set(ds.records[0].masks) == {"EX", "HE"}


def test_official_layout_lists_both_splits_with_their_masks(idrid_folder):
    ds = open_dataset(idrid_folder)
    assert ds.layout == "idrid"
    assert [r.stem for r in ds.records] == ["IDRiD_01", "IDRiD_02", "IDRiD_55"]
    assert set(ds.records[0].masks) == {"EX"}
    assert ds.records[0].masks["EX"].parent.name == "3. Hard Exudates"
    assert set(ds.records[1].masks) == {"MA"}
    assert set(ds.records[2].masks) == {"EX"}
    assert "b. Testing Set" in str(ds.records[2].image)


def test_flat_layout_pairs_masks_with_images(flat_folder):
    ds = open_dataset(flat_folder)
    assert ds.layout == "flat"
    assert [r.image.name for r in ds.records] == ["IDRiD_01.jpg", "IDRiD_02.jpg"]
    assert set(ds.records[0].masks) == {"EX", "HE"}
    assert ds.records[1].masks == {}
    assert ds.index_of(flat_folder / "IDRiD_02.jpg") == 1
    assert ds.index_of("IDRiD_01.jpg") == 0
    assert ds.index_of("nope.jpg") == -1


def test_natural_order_and_non_image_folders(tmp_path):
    for name in ("im_10.png", "im_2.png", "im_1.png"):
        (tmp_path / name).write_bytes(b"")
    ds = open_dataset(tmp_path)
    assert [r.image.name for r in ds.records] == ["im_1.png", "im_2.png", "im_10.png"]
    empty = tmp_path / "empty"
    empty.mkdir()
    (empty / "notes.txt").write_text("x")
    assert open_dataset(empty) is None
    assert open_dataset(tmp_path / "missing") is None


def test_project_folder_is_a_one_image_dataset(tmp_path):
    proj = tmp_path / "eye.retina"
    proj.mkdir()
    (proj / "eye.jpg").write_bytes(b"")
    (proj / "eye_OD.tif").write_bytes(b"")
    assert is_project_folder(proj)
    ds = open_dataset(proj)
    assert ds.layout == "project"
    assert ds.records[0].project == proj
    assert set(ds.records[0].masks) == {"OD"}
    # a folder of projects opens each of them
    ds2 = open_dataset(tmp_path)
    assert [r.stem for r in ds2.records] == ["eye"]
    assert Path(ds2.records[0].project) == proj
