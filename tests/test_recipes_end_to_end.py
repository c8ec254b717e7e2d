"""Every trainable model (refiner, exudates, ma-hgn, ma-prn), end to end in a subprocess on CPU, each
trained once: two DistributedDataParallel processes (torchrun) writing one loadable model folder; and
the same curve for the same seed (the one trainer's seeding, shown on one recipe)."""

import json
import os
import subprocess
import sys
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import blob_mask, fundus_rgb, write_palette_mask

ROOT = Path(__file__).resolve().parents[1]
TINY = {
    "refiner": ["--patch-size", "64", "--samples-per-epoch", "8", "--base-channels", "4", "--reduction", "1.0"],
    "exudates": ["--samples-per-epoch", "8", "--patch-size", "32", "--scale", "1.0", "--base-channels", "4",
                 "--depth", "2", "--loss", "contrastive"],
    "ma-hgn": ["--samples-per-epoch", "8", "--patch-size", "32", "--base-channels", "4", "--depth", "2"],
    "ma-prn": ["--samples-per-epoch", "6", "--widths", "4", "8", "8", "16", "--healthy-per-image", "20",
               "--refresh-size", "10"],
}
KIND = {"refiner": "refiner", "exudates": "exudates", "ma-hgn": "ma-hgn", "ma-prn": "ma-prn"}


@pytest.fixture(scope="module")
def folder(tmp_path_factory):
    d = tmp_path_factory.mktemp("lesions")
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        rgb = fundus_rgb(i)
        ex = blob_mask([(int(rng.integers(25, 70)), int(rng.integers(30, 100))) for _ in range(3)], radius=3)
        ma = blob_mask([(int(rng.integers(25, 70)), int(rng.integers(30, 100))) for _ in range(4)], radius=1) & ~ex
        rgb[ex] = (235, 225, 120)
        rgb[ma] = (60, 20, 10)
        Image.fromarray(rgb).save(d / f"IDRiD_{i:02d}.png")
        write_palette_mask(d / f"IDRiD_{i:02d}_EX.tif", ex)
        write_palette_mask(d / f"IDRiD_{i:02d}_MA.tif", ma)
    return d


def _train(cmd_prefix, recipe, folder, out, extra=()):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    env.pop("WORLD_SIZE", None)
    r = subprocess.run([*cmd_prefix, "-m", "training", recipe, "--data", str(folder), "--out", str(out),
                        "--epochs", "2", "--batch-size", "2", "--val-images", "IDRiD_03.png", "--device", "cpu",
                        "--seed", "3", *TINY[recipe], *extra], capture_output=True, text=True, env=env, timeout=300)
    assert r.returncode == 0, r.stderr[-2000:]
    return [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]


def _launcher() -> list[str]:
    """Two DistributedDataParallel processes (torchrun) where torch has torch.distributed, else one."""
    if torch.distributed.is_available():
        return [sys.executable, "-m", "torch.distributed.run", "--standalone", "--nproc_per_node=2"]
    return [sys.executable]


@pytest.mark.parametrize("recipe", list(TINY))
def test_each_recipe_trains_once_in_a_subprocess_into_one_folder_the_registry_loads(recipe, folder, tmp_path):
    """Each recipe is trained once (two torchrun processes where possible): one process speaks,
    both epochs run, and the folder passes the registry and loads."""
    from napari_retina.models.registry import check_model_folder, load_model

    launcher = _launcher()
    log = _train(launcher, recipe, folder, tmp_path / "run")
    start = [e for e in log if e["event"] == "start"]
    assert len(start) == 1 and start[0]["world_size"] == (2 if len(launcher) > 1 else 1)
    assert [e["epoch"] for e in log if e["event"] == "epoch"] == [1, 2]
    assert check_model_folder(tmp_path / "run", expect=KIND[recipe])["model"] == KIND[recipe]
    assert load_model(tmp_path / "run") is not None
    card = (tmp_path / "run" / "card.md").read_text()
    if recipe in ("exudates", "ma-hgn"):  # the card says how to score it at full resolution
        assert f"napari-retina evaluate {'ma' if recipe == 'ma-hgn' else 'ex'} " in card


def test_the_same_seed_gives_the_same_curve(folder, tmp_path):
    """Seeding is the one trainer's (every recipe goes through it): one recipe, run twice, shows it."""
    first = _train([sys.executable], "exudates", folder, tmp_path / "a")
    again = _train([sys.executable], "exudates", folder, tmp_path / "b")
    curve = [e["train_loss"] for e in first if e["event"] == "epoch"]
    assert len(curve) == 2 and curve == [e["train_loss"] for e in again if e["event"] == "epoch"]


@pytest.mark.parametrize("recipe", ["refiner", "exudates", "ma-prn"])
def test_one_labelled_image_is_advice_in_one_line_and_leaves_no_model_folder(recipe, tmp_path):
    d = tmp_path / "one"
    d.mkdir()
    rgb = fundus_rgb(1)
    Image.fromarray(rgb).save(d / "IDRiD_01.png")
    write_palette_mask(d / "IDRiD_01_EX.tif", blob_mask([(30, 40)], radius=3))
    write_palette_mask(d / "IDRiD_01_MA.tif", blob_mask([(50, 60)], radius=1))
    out = tmp_path / "models" / "v1"
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    r = subprocess.run([sys.executable, "-m", "training", recipe, "--data", str(d), "--out", str(out), "--epochs", "1",
                        "--device", "cpu"], capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2
    (line,) = r.stderr.strip().splitlines()  # one line, no traceback
    assert "only IDRiD_01.png has a label for" in line and "tick *reviewed*" in line and "IDRiD-layout folder" in line
    assert not out.exists() and not (tmp_path / "models").exists()  # no empty version folder left behind


def test_a_run_that_fails_after_preparing_leaves_no_version_folder_but_an_existing_one_stays(folder, tmp_path):
    env = {**os.environ, "PYTHONPATH": os.pathsep.join([str(ROOT), os.environ.get("PYTHONPATH", "")])}
    # a budget spent before training starts: split and log were written, then the trainer refuses
    args = ["--data", str(folder), "--minutes", "0.001", "--device", "cpu", *TINY["exudates"]]
    out = tmp_path / "v1"
    r = subprocess.run([sys.executable, "-m", "training", "exudates", "--out", str(out), *args],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and "budget leaves no time to train" in r.stderr.strip().splitlines()[-1]
    assert not out.exists()
    mine = tmp_path / "mine"
    mine.mkdir()
    (mine / "notes.txt").write_text("mine")
    r = subprocess.run([sys.executable, "-m", "training", "exudates", "--out", str(mine), *args],
                       capture_output=True, text=True, env=env, timeout=120)
    assert r.returncode == 2 and (mine / "notes.txt").read_text() == "mine"  # a folder it did not make is kept


def test_the_log_shows_the_preparation_then_every_step_with_elapsed_time_and_eta(folder, tmp_path):
    log = _train([sys.executable], "exudates", folder, tmp_path / "a")
    kinds = [e["event"] for e in log]
    assert kinds[0] == "prepare" and kinds.index("start") > kinds.index("prepare")
    prepare = [e for e in log if e["event"] == "prepare"]
    assert [e["done"] for e in prepare] == [1, 2, 3] and all(e["total"] == 3 for e in prepare)
    steps = [e for e in log if e["event"] == "step"]
    assert steps[0]["step"] == 1 and all(e["elapsed"] >= prepare[-1]["elapsed"] and e["eta"] >= 0 for e in steps)
    assert log[-1]["event"] == "end" and log[-1]["elapsed"] >= steps[-1]["elapsed"]
