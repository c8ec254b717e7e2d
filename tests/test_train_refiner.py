"""python -m training refiner: a tiny run on CPU writes a usable model folder and resumes."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import blob_mask, fundus_rgb, write_palette_mask
from napari_retina.io.ellipses import Ellipse
from napari_retina.models.refiner import EllipseRefiner
from napari_retina.nets.refiner import RefinerNet
from training.__main__ import main as training_main
from training.losses import bce_dice_loss

TINY = ["--patch-size", "64", "--batch-size", "4", "--samples-per-epoch", "8", "--base-channels", "4",
        "--device", "cpu", "--quiet"]


@pytest.fixture
def lesion_folder(tmp_path) -> Path:
    """Four flat-layout images with EX and MA blobs (one becomes the validation image)."""
    d = tmp_path / "lesions"
    d.mkdir()
    for i in range(4):
        Image.fromarray(fundus_rgb(i)).save(d / f"IDRiD_{i + 1:02d}.jpg", quality=95)
        write_palette_mask(d / f"IDRiD_{i + 1:02d}_EX.tif", blob_mask([(30 + 5 * i, 40), (60, 70 + 3 * i)], radius=4))
        write_palette_mask(d / f"IDRiD_{i + 1:02d}_MA.tif", blob_mask([(40, 90 - 2 * i)], radius=1))
    return d


def _events(log: Path) -> list[dict]:
    return [json.loads(line) for line in log.read_text().splitlines()]


def test_a_few_steps_lower_the_refiner_loss():
    torch.manual_seed(0)
    rng = np.random.default_rng(0)
    # a bright disc inside a larger coarse ellipse: the network must learn to keep only the disc
    yy, xx = np.mgrid[:32, :32]
    image = torch.from_numpy(rng.normal(0, 0.3, (4, 3, 32, 32)).astype(np.float32))
    disc = torch.from_numpy(((yy - 16) ** 2 + (xx - 16) ** 2 <= 16).astype(np.float32))
    coarse = torch.from_numpy(((yy - 16) ** 2 + (xx - 16) ** 2 <= 100).astype(np.float32))
    image[:, 1] += 2 * disc
    mask, target = coarse.expand(4, 1, 32, 32), disc.expand(4, 1, 32, 32)
    for variant in ("prototype", "baseline"):
        net = RefinerNet(base_channels=4, variant=variant)
        opt = torch.optim.Adam(net.parameters(), lr=1e-2)
        losses = []
        for _ in range(15):
            loss = bce_dice_loss(net(image, mask), target)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(float(loss.detach()))
        assert losses[-1] < 0.8 * losses[0], (variant, losses)


def test_training_writes_a_model_folder_that_refines_and_resume_continues(lesion_folder, tmp_path):
    out = tmp_path / "model"
    assert training_main(["refiner", "--data", str(lesion_folder), "--out", str(out), "--epochs", "2", *TINY]) == 0

    config = json.loads((out / "config.json").read_text())
    split = json.loads((out / "run" / "split.json").read_text())
    assert len(split["val"]) == 1 and len(split["train"]) == 3
    assert config["validation_images"] == split["val"]
    assert config["net"]["variant"] == "prototype" and config["geometry"]["size"] == 64
    # both prototype forms were validated; the shipped switch is the better one
    t = config["training"]
    better_sp = t["val_image_iou_superpixels"] > t["val_image_iou_plain"]
    assert config["superpixels"] is better_sp
    card = (out / "card.md").read_text()
    assert split["val"][0] in card and config["weights_sha256"] in card and "--epochs 2" in card

    epochs = [e for e in _events(out / "run" / "log.jsonl") if e["event"] == "epoch"]
    assert [e["epoch"] for e in epochs] == [1, 2]
    assert all(0 <= e["val_iou"] <= 100 for e in epochs)

    # the shipped inference path loads what training wrote
    rgb = fundus_rgb(0)
    e = Ellipse("EX", (40.0, 30.0), (9.0, 7.0), 10.0)
    prob = EllipseRefiner(out).refine_probability(rgb, [e])
    assert prob.shape == rgb.shape[:2] and prob.max() > 0
    assert prob[0, 0] == 0  # nothing outside the ellipse

    assert training_main(["refiner", "--data", str(lesion_folder), "--out", str(out), "--epochs", "3",
                          "--resume", *TINY]) == 0
    events = _events(out / "run" / "log.jsonl")
    starts = [e for e in events if e["event"] == "start"]
    assert starts[-1]["resume"] is True and starts[-1]["start_epoch"] == 3
    assert [e["epoch"] for e in events if e["event"] == "epoch"] == [1, 2, 3]
    ckpt = torch.load(out / "run" / "checkpoints" / "last.pt", weights_only=True)
    assert ckpt["epoch"] == 3
    assert json.loads((out / "run" / "split.json").read_text()) == split


def test_fine_tuning_keeps_counting_epochs_and_the_parents_split(lesion_folder, tmp_path):
    parent = tmp_path / "parent"
    assert training_main(["refiner", "--data", str(lesion_folder), "--out", str(parent), "--epochs", "1",
                          "--val-images", "IDRiD_03.jpg", *TINY]) == 0
    child = tmp_path / "child"
    assert training_main(["refiner", "--data", str(lesion_folder), "--out", str(child), "--epochs", "2",
                          "--init", str(parent), *TINY]) == 0
    p, c = (json.loads((d / "config.json").read_text()) for d in (parent, child))
    assert c["validation_images"] == ["IDRiD_03.jpg"]  # the parent's held-out image stays held out
    assert c["training"]["epochs"] == p["training"]["epochs"] + c["training"]["epochs_this_run"]
    assert c["training"]["minutes"] >= p["training"]["minutes"]
    # the parent by kind, version and checksum, never by its folder
    assert c["training"]["parent"] == {"model": "refiner", "version": p["version"], "weights_sha256": p["weights_sha256"]}
    assert p["weights_sha256"] in (child / "card.md").read_text() and str(parent) not in (child / "card.md").read_text()
    assert c["geometry"]["max_scale"] == 2.0 and c["training"]["early_stopping_patience"] == 8


def test_baseline_variant_and_named_validation_images(lesion_folder, tmp_path):
    out = tmp_path / "baseline"
    rc = training_main(["refiner", "--data", str(lesion_folder), "--out", str(out), "--epochs", "1",
                        "--variant", "baseline", "--val-images", "IDRiD_02.jpg", *TINY])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["net"]["variant"] == "baseline" and config["superpixels"] is False
    assert config["validation_images"] == ["IDRiD_02.jpg"]


def test_validation_at_several_reductions_follows_their_mean(lesion_folder, tmp_path):
    out = tmp_path / "model"
    assert training_main(["refiner", "--data", str(lesion_folder), "--out", str(out), "--epochs", "1",
                          "--val-reduction", "1.0", "2.0", *TINY]) == 0
    t = json.loads((out / "config.json").read_text())["training"]
    assert t["val_reduction"] == [1.0, 2.0]
    # the monitored figure is the mean of the two reductions' averages, at one threshold
    assert t["val_image_iou"] == pytest.approx((t["val_image_iou_r1"] + t["val_image_iou_r2"]) / 2, abs=0.02)
    card = (out / "card.md").read_text()
    assert "reductions 1.0, 2.0, each figure the mean over them" in card
    assert f"| average at reduction 2 | {t['val_image_iou_r2']:.1f} |" in card
    epoch = [e for e in _events(out / "run" / "log.jsonl") if e["event"] == "epoch"][0]
    assert {"val_iou_r1", "val_iou_r2"} <= set(epoch)


@pytest.mark.parametrize(
    "args, words",
    [
        (["--epochs", "1", "--val-images", "IDRiD_99.jpg"], "IDRiD_99"),
        (["--epochs", "1", "--resume"], "resume"),
        (["--epochs", "1", "--device", "cuda"], "cuda"),
    ],
)
def test_bad_input_is_one_line_and_exit_code_2(lesion_folder, tmp_path, capsys, args, words):
    if "cuda" in args and torch.cuda.is_available():
        pytest.skip("this machine has a GPU")
    rc = training_main(["refiner", "--data", str(lesion_folder), "--out", str(tmp_path / "m"), *TINY, *args])
    err = capsys.readouterr().err.strip()
    assert rc == 2
    assert len(err.splitlines()) == 1 and err.startswith("training refiner: error:") and words in err
    assert not (tmp_path / "m" / "weights.safetensors").exists()


def test_a_second_training_into_the_same_folder_stops_with_one_line(lesion_folder, tmp_path, capsys):
    from filelock import FileLock

    out = tmp_path / "model"
    (out / "run").mkdir(parents=True)
    held = FileLock(str(out / "run" / ".lock"))
    held.acquire()  # as a run still finishing its epoch holds it
    try:
        rc = training_main(["refiner", "--data", str(lesion_folder), "--out", str(out), "--epochs", "1", *TINY])
    finally:
        held.release()
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "being trained by another process" in err
    assert not (out / "weights.safetensors").exists() and not (out / "run" / "log.jsonl").exists()
    # once the other run has ended, the same command trains
    assert training_main(["refiner", "--data", str(lesion_folder), "--out", str(out), "--epochs", "1", *TINY]) == 0
    assert (out / "weights.safetensors").is_file()


def test_missing_budget_and_bad_folder_exit_2(tmp_path, capsys):
    with pytest.raises(SystemExit) as e:
        training_main(["refiner", "--data", str(tmp_path), "--out", str(tmp_path / "m")])
    assert e.value.code == 2 and "--epochs" in capsys.readouterr().err
    with pytest.raises(SystemExit) as e:
        training_main(["refiner", "--data", str(tmp_path), "--out", str(tmp_path / "m"), "--epochs", "1",
                       "--val-reduction", "1.0", "0.5"])
    assert e.value.code == 2 and "--val-reduction factors must be >= 1.0" in capsys.readouterr().err
    rc = training_main(["refiner", "--data", str(tmp_path / "nowhere"), "--out", str(tmp_path / "m" / "new"),
                        "--epochs", "1"])
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    assert not (tmp_path / "m").exists()  # a run that stopped before writing leaves no folder behind
    kept = tmp_path / "kept"
    kept.mkdir()
    (kept / "notes.txt").write_text("mine")
    rc = training_main(["refiner", "--data", str(tmp_path / "nowhere"), "--out", str(kept), "--epochs", "1"])
    assert rc == 2 and "not a folder" in capsys.readouterr().err
    assert sorted(q.name for q in kept.iterdir()) == ["notes.txt"]  # an existing --out keeps what it held
