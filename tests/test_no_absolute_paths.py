"""No file that leaves the machine holds a path of it: a model folder's card.md and config.json
(recorded commands, data, parent) and an annotation project folder (image, masks, models).

Folder names on a training machine or in a clinic can be a user's or a patient's, and a
project folder moved to another machine must stay valid."""

import json
import os
import shutil
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
from PIL import Image

from conftest import EX_BLOBS, HE_BLOBS, blob_mask, fundus_rgb, write_palette_mask

ROOT = Path(__file__).resolve().parents[1]
PRIVATE = "Jane-Doe-1961"  # a folder name that must never leave the machine
TINY_HGN = ["--samples-per-epoch", "4", "--patch-size", "32", "--base-channels", "4", "--depth", "2",
            "--epochs", "1", "--batch-size", "2", "--val-images", "IDRiD_03.png", "--device", "cpu", "--seed", "3",
            "--quiet"]


def _forbidden(tmp_path) -> list[str]:
    """What no written file may contain: the temporary folder, the private folder name, the home folder."""
    out = [str(tmp_path), str(tmp_path.resolve()), PRIVATE]
    home = str(Path.home())
    if len(home) > 1:  # "/" would match every relative path too
        out.append(home)
    return out


def _absolute_strings(obj) -> list[str]:
    """Every string in a JSON-like object that is an absolute path (or one under ~)."""
    if isinstance(obj, dict):
        return [s for v in obj.values() for s in _absolute_strings(v)]
    if isinstance(obj, list):
        return [s for v in obj for s in _absolute_strings(v)]
    if isinstance(obj, str) and (obj.startswith(("/", "~")) or (len(obj) > 2 and obj[1:3] in (":\\", ":/"))):
        return [obj]
    return []


def _assert_no_paths(text: str, tmp_path, where: str) -> None:
    for s in _forbidden(tmp_path):
        assert s not in text, f"{where} holds {s!r}"


# --- model folders -----------------------------------------------------------------------------

@pytest.fixture(scope="module")
def private_data(tmp_path_factory):
    """A tiny flat data folder under a folder whose name is private."""
    d = tmp_path_factory.mktemp("paths") / PRIVATE / "fundus-data"
    d.mkdir(parents=True)
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        rgb = fundus_rgb(i)
        ma = blob_mask([(int(rng.integers(25, 70)), int(rng.integers(30, 100))) for _ in range(4)], radius=1)
        rgb[ma] = (60, 20, 10)
        Image.fromarray(rgb).save(d / f"IDRiD_{i:02d}.png")
        write_palette_mask(d / f"IDRiD_{i:02d}_MA.tif", ma)
    return d


def _train(args, cwd):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([sys.executable, "-m", "training", "ma-hgn", *args, *TINY_HGN],
                       capture_output=True, text=True, env=env, timeout=300, cwd=cwd)
    assert r.returncode == 0, r.stderr[-2000:]


@pytest.mark.slow
def test_a_recipe_run_given_absolute_paths_writes_none_into_card_or_config(private_data, tmp_path):
    """--data, --out and --init absolute, under a private folder: the card and config name the
    data folder by its last component and the parent by version and checksum."""
    from napari_retina.models.registry import check_model_folder

    home = tmp_path / PRIVATE
    parent = home / "models" / "parent"
    _train(["--data", str(private_data.resolve()), "--out", str(parent.resolve()), "--scale", "1.0",
            "--version", "parent-v1"], cwd=tmp_path)
    child = home / "models" / "child"
    _train(["--data", str(private_data.resolve()), f"--out={child.resolve()}", "--init", str(parent.resolve()),
            "--scale", "1.0", "--version", "child-v2"], cwd=tmp_path)

    parent_config = check_model_folder(parent, expect="ma-hgn")
    config = check_model_folder(child, expect="ma-hgn")  # still loads: checksum and card agree
    card = (child / "card.md").read_text(encoding="utf-8")
    config_text = (child / "config.json").read_text(encoding="utf-8")
    forbidden = [*_forbidden(tmp_path), *_forbidden(private_data.parents[1])]
    for s in forbidden:
        assert s not in card and s not in config_text, s
    assert _absolute_strings(config) == []
    # what a user can still reproduce: the data folder's name, the relative command, the parent
    t = config["training"]
    assert "--data fundus-data" in t["command"] and "--out=child" in t["command"] and "--init parent" in t["command"]
    assert t["parent"] == {"model": "ma-hgn", "version": "parent-v1", "weights_sha256": parent_config["weights_sha256"]}
    assert parent_config["weights_sha256"] in card and "parent-v1" in card
    assert "fundus-data" in card and "last component" in card  # the rule is said in the card


def test_the_command_rule_keeps_relative_paths_and_shortens_the_others():
    from training.recipes._main import portable_command, portable_path, portable_record

    assert portable_path("runs/exudates") == "runs/exudates"
    assert portable_path("/home/kim/IDRiD/train") == "train"
    assert portable_path("../shared/data/idrid-train") == "idrid-train"
    assert portable_path("~/data") == "data"
    assert portable_path("C:\\Users\\kim\\idrid") == "idrid"
    assert portable_path("cuda:0") == "cuda:0" and portable_path("1e-4") == "1e-4"
    assert (portable_command("python -m training refiner", ["--data", "/srv/a b/idrid", "--out=/x/runs/r", "--lr", "1e-4"])
            == "python -m training refiner --data idrid --out=r --lr 1e-4")
    old = {"command": "python -m training ma-hgn --data /work/x/idrid --out runs/a", "parent": "/work/m/p",
           "folder": "/work/m", "loss": "a + b"}
    assert portable_record(old) == {"command": "python -m training ma-hgn --data idrid --out runs/a", "parent": "p",
                                    "loss": "a + b"}


def test_shipped_cards_and_configs_hold_no_path_of_the_machine_they_were_trained_on():
    folders = [*(ROOT / "napari_retina" / "models" / "weights").iterdir(), *(ROOT / "benchmarks" / "models").iterdir()]
    folders = [f for f in folders if (f / "config.json").is_file()]
    assert len(folders) >= 4
    for f in folders:
        config = json.loads((f / "config.json").read_text(encoding="utf-8"))
        card = (f / "card.md").read_text(encoding="utf-8")
        assert _absolute_strings(config) == [], f
        for text in (card, json.dumps(config)):
            assert "/work/" not in text and "../shared" not in text and "models-in-training" not in text, f
            assert " session " not in text.lower(), f
        parent = config.get("training", {}).get("parent")
        assert parent is None or isinstance(parent, dict) and len(parent["weights_sha256"]) == 64, f


# --- annotation project folders ----------------------------------------------------------------

def _project_texts(folder: Path) -> dict[str, str]:
    return {p.name: p.read_text(encoding="utf-8") for p in folder.rglob("*") if p.suffix in (".json", ".csv")}


def _annotated(tmp_path):
    """An image with masks in a private folder, opened as the reader does, with proposals of
    the shipped models, an ellipse and a reviewed lesion, saved into its project folder."""
    from napari_retina.io.datasets import open_dataset
    from napari_retina.io.ellipses import Ellipse, EllipseFile
    from napari_retina.io.project import ProjectFolder
    from napari_retina.models.registry import load_model, shipped_model_dir
    from napari_retina.session import open_record

    data = tmp_path / PRIVATE / "clinic"
    data.mkdir(parents=True)
    rgb = fundus_rgb(3)
    Image.fromarray(rgb).save(data / "eye.png")
    write_palette_mask(data / "eye_EX.tif", blob_mask(EX_BLOBS))
    (record,) = open_dataset(data).records
    opened = open_record(record)
    ann = opened.annotation
    assert ann.provenance["initial_masks"] == {"EX": "eye_EX.tif"}  # by file name
    ann.masks["HE"] = blob_mask(HE_BLOBS, radius=5)
    ann.ellipses = EllipseFile(image="eye.png", ellipses=[Ellipse("EX", (40.0, 30.0), (6.0, 3.0), 30.0, {"id": "a1"})])
    refiner = load_model(shipped_model_dir("refiner"))
    ann.provenance.setdefault("models", {})["refiner"] = refiner.description
    prob = np.zeros((10, 12), np.float32)
    prob[2:8, 3:9] = 0.9
    ann.record.propose("MA", (50, 60, 60, 72), prob=prob, threshold=0.5,
                       description=dict(refiner.description, kind="model", ellipse_id="a1"))
    ann.set_reviewed("EX", True, "kim")
    project = ProjectFolder.create(opened.project_dir, record.image, grader="kim")
    project.save(ann, rgb=rgb, grader="kim")
    return project.path, ann, refiner


def test_a_moved_project_reopens_whole_and_none_of_its_files_holds_a_path(tmp_path):
    from napari_retina.io.images import sha256_file
    from napari_retina.io.project import ProjectFolder

    folder, ann, refiner = _annotated(tmp_path)
    for name, text in _project_texts(folder).items():
        _assert_no_paths(text, tmp_path, name)
        if name.endswith(".json"):
            assert _absolute_strings(json.loads(text)) == [], name
    prov = json.loads((folder / "provenance.json").read_text())
    assert prov["image"] == "eye.png" and prov["image_sha256"] == sha256_file(folder / "eye.png")
    assert prov["models"]["refiner"] == {"model": "refiner", "version": refiner.version,
                                         "weights_sha256": refiner.config["weights_sha256"]}

    moved = tmp_path / "elsewhere" / folder.name
    moved.parent.mkdir()
    shutil.move(str(folder), str(moved))
    assert not folder.exists()
    back = ProjectFolder(moved).load()
    for code in ann.masks:
        np.testing.assert_array_equal(back.masks[code], ann.masks[code])
    assert [(e.lesion, e.center_xy, e.semi_axes) for e in back.ellipses.ellipses] == \
        [(e.lesion, e.center_xy, e.semi_axes) for e in ann.ellipses.ellipses]
    [p] = back.record.find(ellipse_id="a1")
    assert p.lesion == "MA" and p.description["version"] == refiner.version and "folder" not in p.description
    assert back.reviewed == ann.reviewed and "EX" in back.reviewed
    for key in ("image", "image_sha256", "grader", "initial_masks", "models"):
        assert back.provenance[key] == prov[key]
    ProjectFolder(moved).save(back)  # saved again where it is now: still no path
    for name, text in _project_texts(moved).items():
        _assert_no_paths(text, tmp_path, name)


def test_an_older_project_with_absolute_paths_loses_them_at_its_next_save(tmp_path):
    from napari_retina.io.project import ProjectFolder

    folder, _, _ = _annotated(tmp_path)
    prov_file = folder / "provenance.json"
    prov = json.loads(prov_file.read_text())
    private = str(tmp_path / PRIVATE / "clinic")
    prov["source_image"] = private + "/eye.png"
    prov["initial_masks"] = {"EX": private + "/eye_EX.tif"}
    prov["models"]["refiner"]["folder"] = "/home/kim/models/refiner"
    prov_file.write_text(json.dumps(prov))
    table_file = folder / "proposals.json"
    table = json.loads(table_file.read_text())
    table["proposals"][0]["description"]["folder"] = "/home/kim/models/refiner"
    table_file.write_text(json.dumps(table))

    ann = ProjectFolder(folder).load()
    assert "source_image" not in ann.provenance  # nothing that reads the project needs it
    ProjectFolder(folder).save(ann)
    saved = json.loads(prov_file.read_text())
    assert "source_image" not in saved and saved["initial_masks"] == {"EX": "eye_EX.tif"}
    assert "folder" not in saved["models"]["refiner"] and saved["models"]["refiner"]["version"]
    assert "folder" not in json.loads(table_file.read_text())["proposals"][0]["description"]
    for name, text in _project_texts(folder).items():
        _assert_no_paths(text, tmp_path, name)
        assert "/home/kim" not in text, name


def test_the_previous_writers_project_drops_its_source_image_at_the_next_save(tmp_path):
    """tests/data/project_format1 was written with the image's absolute location."""
    from napari_retina.io.project import ProjectFolder

    folder = tmp_path / "eye.retina"
    shutil.copytree(ROOT / "tests" / "data" / "project_format1", folder)
    assert "source_image" in json.loads((folder / "provenance.json").read_text())
    ann = ProjectFolder(folder).load()
    ProjectFolder(folder).save(ann)
    prov = json.loads((folder / "provenance.json").read_text())
    assert "source_image" not in prov and prov["reviewed"].keys() == {"EX", "MA", "HE"}
    assert _absolute_strings(prov) == []
