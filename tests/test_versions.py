"""Model versions in the user's data folder: list, select, import; a failing checksum is refused."""

import json
import shutil

import pytest
import torch

from napari_retina.models.folder import write_model_folder
from napari_retina.models.registry import ModelFolderError, shipped_model_dir
from napari_retina.models.versions import (
    current_model_dir, data_root, import_model, new_version_dir, select, versions,
)
from napari_retina.nets.segmentation import SegmentationNet


def _exudate_folder(folder, version, aupr):
    torch.manual_seed(0)
    net = SegmentationNet(backbone="unet", base_channels=4, depth=2)
    cfg = {"model": "exudates", "lesion": "EX", "version": version, "net": net.config(), "input_scale": 1.0,
           "threshold": 0.5, "training": {"epochs": 1, "val_aupr_working_scale": aupr, "parent": None}}
    return write_model_folder(folder, net.state_dict(), cfg, "t {sha256}")


def test_the_shipped_model_is_the_first_version_and_a_selected_one_is_used_from_then_on(user_data_folder, tmp_path):
    from napari_retina.segmentation import load_segmenter

    assert data_root() == user_data_folder
    first = versions("exudates")
    assert [v.shipped for v in first] == [True] and first[0].folder == shipped_model_dir("exudates")
    assert current_model_dir("exudates") == shipped_model_dir("exudates")
    new = _exudate_folder(new_version_dir("exudates", "2026.12.02 mine"), "2026.12.02-mine", 0.61)
    assert new.parent == user_data_folder / "models" / "exudates" and new.name == "2026.12.02-mine"
    listed = versions("exudates")
    assert [v.version for v in listed][-1] == "2026.12.02-mine" and "aupr_working_scale 0.61" in listed[-1].label
    select("exudates", new)
    assert current_model_dir("exudates") == new.resolve()
    assert load_segmenter("EX").version == "2026.12.02-mine"  # the segmenters use the selected version
    assert json.loads((user_data_folder / "selected.json").read_text())["selected"]["exudates"] == str(new.resolve())
    # the previous version stays, and going back is one call
    select("exudates", shipped_model_dir("exudates"))
    assert load_segmenter("EX").version == versions("exudates")[0].version
    assert new.is_dir()
    # a name already taken gets a new folder
    assert new_version_dir("exudates", "2026.12.02 mine").name == "2026.12.02-mine-2"


def test_a_tampered_or_foreign_folder_is_refused_and_never_selected(tmp_path):
    good = _exudate_folder(tmp_path / "good", "v1", 0.5)
    bad = tmp_path / "bad"
    shutil.copytree(good, bad)
    w = bad / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-2] + b"\x00\x01")
    with pytest.raises(ModelFolderError, match="checksum"):
        select("exudates", bad)
    with pytest.raises(ModelFolderError, match="checksum"):
        import_model(bad)
    with pytest.raises(ModelFolderError, match="not a refiner model"):
        select("refiner", good)
    assert current_model_dir("exudates") == shipped_model_dir("exudates")
    copied = import_model(good)  # trained elsewhere: checked, copied in, listed
    assert copied != good and copied.is_dir() and any(v.folder == copied for v in versions("exudates"))
