"""The model registry: folders load by the `model` their config names, checksum checked, one message."""

import json
import shutil
import subprocess
import sys

import numpy as np
import pytest

from napari_retina.io.ellipses import Ellipse
from napari_retina.models.folder import CARD, CONFIG, WEIGHTS, write_model_folder
from napari_retina.models.refiner import EllipseRefiner
from napari_retina.models.registry import (
    ModelFolderError,
    check_model_folder,
    load_model,
    shipped_model_dir,
)


@pytest.fixture()
def refiner_folder(tmp_path):
    from napari_retina.nets.refiner import RefinerNet

    net = RefinerNet(base_channels=4, depth=3, fused_channels=8)
    cfg = {"model": "refiner", "version": "t1", "net": net.config(), "geometry": {"size": 64}, "threshold": 0.4}
    return write_model_folder(tmp_path / "m", net.state_dict(), cfg, "test model\n\nweights.safetensors SHA-256: {sha256}\n")


def test_a_folder_loads_as_the_model_its_config_names(refiner_folder):
    model = load_model(refiner_folder)
    assert isinstance(model, EllipseRefiner)
    assert model.version == "t1" and model.threshold == pytest.approx(0.4) and model.model_dir == refiner_folder
    prob = model.refine_probability(np.full((80, 90, 3), 120, np.uint8), [Ellipse("EX", (40.0, 40.0), (12.0, 8.0), 0.0)])
    assert prob.shape == (80, 90) and prob.max() > 0


def test_the_shipped_refiner_loads_through_the_registry():
    model = load_model(expect="refiner")
    assert model.model_dir == shipped_model_dir("refiner")
    assert model.version == json.loads((shipped_model_dir("refiner") / CONFIG).read_text())["version"]


def test_changed_weights_are_refused_with_one_line(refiner_folder):
    w = refiner_folder / WEIGHTS
    data = bytearray(w.read_bytes())
    data[-1] ^= 0xFF  # one flipped byte of a tensor
    w.write_bytes(bytes(data))
    for load in (lambda: load_model(refiner_folder), lambda: EllipseRefiner(refiner_folder)):
        with pytest.raises(ModelFolderError) as err:
            load()
        msg = str(err.value)
        assert "\n" not in msg and str(w) in msg and "checksum" in msg


def test_a_card_that_states_another_checksum_is_refused(refiner_folder):
    card = refiner_folder / CARD
    card.write_text(card.read_text().replace("SHA-256: ", "SHA-256: " + "0" * 64 + " was "))
    with pytest.raises(ModelFolderError, match="states checksum 000000000000"):
        check_model_folder(refiner_folder)


@pytest.mark.parametrize(
    "edit, words",
    [
        (lambda c: c.update(model="cataract"), "names model 'cataract'"),
        (lambda c: c.pop("model"), "names model None"),
        (lambda c: c.pop("weights_sha256"), "no weights_sha256"),
    ],
)
def test_configs_that_cannot_be_trusted_are_refused(refiner_folder, edit, words):
    cfg = json.loads((refiner_folder / CONFIG).read_text())
    edit(cfg)
    (refiner_folder / CONFIG).write_text(json.dumps(cfg))
    with pytest.raises(ModelFolderError, match=words):
        load_model(refiner_folder)


def test_a_model_of_another_kind_is_refused_where_a_refiner_is_expected(refiner_folder, tmp_path, monkeypatch):
    from napari_retina.models import registry

    monkeypatch.setitem(registry.KINDS, "exudates", "napari_retina.models.refiner:EllipseRefiner")
    other = tmp_path / "other"
    shutil.copytree(refiner_folder, other)
    cfg = json.loads((other / CONFIG).read_text())
    (other / CONFIG).write_text(json.dumps(dict(cfg, model="exudates")))
    with pytest.raises(ModelFolderError, match="a exudates model, not a refiner model"):
        EllipseRefiner(other)
    assert check_model_folder(other)["model"] == "exudates"


def test_missing_and_damaged_folders_give_one_message(tmp_path, refiner_folder):
    with pytest.raises(ModelFolderError, match="no such model folder"):
        load_model(tmp_path / "nowhere")
    (refiner_folder / CONFIG).write_text("{ not json")
    with pytest.raises(ModelFolderError, match="unreadable"):
        load_model(refiner_folder)


def test_cli_refuses_a_changed_model_folder_in_one_line_with_code_2(refiner_folder, tmp_path):
    from napari_retina.io.ellipses import EllipseFile, save_ellipses
    from PIL import Image

    Image.fromarray(np.full((60, 60, 3), 100, np.uint8)).save(tmp_path / "a.png")
    save_ellipses(tmp_path / "e.json", EllipseFile("a.png", [Ellipse("EX", (30.0, 30.0), (8.0, 6.0), 0.0)]))
    (refiner_folder / WEIGHTS).write_bytes((refiner_folder / WEIGHTS).read_bytes()[:-4] + b"\0\0\0\0")
    out = subprocess.run(
        [sys.executable, "-m", "napari_retina.cli", "refine", str(tmp_path / "a.png"), "--ellipses",
         str(tmp_path / "e.json"), "--out", str(tmp_path / "out"), "--model", str(refiner_folder)],
        capture_output=True, text=True,
    )
    assert out.returncode == 2, out.stderr
    assert len(out.stderr.strip().splitlines()) == 1 and "checksum" in out.stderr
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())
