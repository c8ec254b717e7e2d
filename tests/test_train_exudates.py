"""python -m training exudates on tiny synthetic data: patches, loss, a model folder that segments."""

import json

import numpy as np
import pytest
import torch

from conftest import fundus_rgb, write_exudate_folder


@pytest.fixture
def ex_folder(tmp_path):
    """Three flat-layout images, each with a few bright exudate blobs and their masks."""
    return write_exudate_folder(tmp_path / "ex")


def test_patches_are_prepared_as_inference_prepares_images(ex_folder):
    from napari_retina.io.datasets import open_dataset
    from napari_retina.models.segmenter import network_input
    from napari_retina.fundus import field_of_view_mask
    from napari_retina.io.images import read_fundus
    from training.data import SegmentationPatches, load_scaled

    rec = open_dataset(ex_folder).records[0]
    im = load_scaled(rec, "EX", 0.5)
    rgb = read_fundus(rec.image)
    x, fov = network_input(rgb, field_of_view_mask(rgb), 0.5)
    np.testing.assert_array_equal(im.x, x)
    assert im.target.max() <= 1 and len(im.lesion_px) > 0
    ds = SegmentationPatches([im], size=32, augment=False, seed=0, length=20, lesion_fraction=1.0)
    items = [ds[k] for k in range(20)]
    assert all(it["image"].shape == (3, 32, 32) and it["target"].shape == (1, 32, 32) for it in items)
    assert all(it["target"].max() >= 0.5 for it in items)  # lesion-centred patches hold a lesion
    # without augmentation a patch is a plain crop of the prepared image
    it = items[0]
    found = False
    for y in range(im.x.shape[1] - 31):
        for xx in range(im.x.shape[2] - 31):
            if np.array_equal(im.x[:, y : y + 32, xx : xx + 32], it["image"].numpy()):
                found = True
                break
        if found:
            break
    assert found


def test_a_few_steps_with_the_contrastive_loss_lower_it(ex_folder):
    from napari_retina.io.datasets import open_dataset
    from napari_retina.nets.segmentation import SegmentationNet
    from training.data import SegmentationPatches, load_scaled
    from training.losses import ExudateLoss

    torch.manual_seed(0)
    ims = [load_scaled(r, "EX", 1.0) for r in open_dataset(ex_folder).records]
    ds = SegmentationPatches(ims, size=32, augment=True, seed=0, length=8)
    batch = {k: torch.stack([ds[i][k] for i in range(8)]) for k in ("image", "target", "fov")}
    net = SegmentationNet(backbone="unet", base_channels=4, depth=2)
    crit = ExudateLoss(grid=4)
    opt = torch.optim.Adam(net.parameters(), lr=1e-2)
    losses, globals_ = [], []
    for _ in range(40):
        logits, feats = net.forward_with_features(batch["image"])
        loss, parts = crit(logits, feats, batch["target"], mask=batch["fov"])
        assert all(torch.isfinite(v) for v in parts.values())
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
        globals_.append(parts["global"].item())
    # the contrastive terms fall more slowly (their floor is set by the temperature): the total
    # must fall, the pixel term clearly
    assert losses[-1] < 0.85 * losses[0], losses
    assert globals_[-1] < 0.7 * globals_[0], globals_


def test_the_recipe_writes_a_model_folder_that_segments(ex_folder, tmp_path, capsys):
    from napari_retina.models.registry import load_model
    from training.recipes.exudates import main

    out = tmp_path / "model"
    rc = main(["--data", str(ex_folder), "--out", str(out), "--epochs", "2", "--samples-per-epoch", "8",
               "--batch-size", "4", "--patch-size", "32", "--scale", "1.0", "--base-channels", "4", "--depth", "2",
               "--val-images", "IDRiD_03.png", "--device", "cpu", "--ema", "0.9", "--quiet"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    # with --ema the folder holds the averaged weights of the best epoch, and says so
    from napari_retina.models.folder import load_state_dict
    from training.trainer import load_checkpoint

    best = load_checkpoint(out / "run" / "checkpoints" / "best.pt")
    shipped = load_state_dict(out)
    assert all(torch.equal(shipped[k], best["ema"][f"module.{k}"]) for k in shipped)
    assert not all(torch.equal(shipped[k], best["model"][k]) for k in shipped)
    assert config["training"]["ema_decay"] == 0.9 and "EMA, decay 0.9" in (out / "card.md").read_text()
    assert config["model"] == "exudates" and config["validation_images"] == ["IDRiD_03.png"]
    assert 0 < config["threshold"] < 1 and config["training"]["epochs"] >= 1
    card = (out / "card.md").read_text()
    assert config["weights_sha256"] in card and "IDRiD_03.png" in card
    seg = load_model(out)
    prob = seg.probability(fundus_rgb(5))
    assert prob.shape == fundus_rgb(5).shape[:2]
    log = [json.loads(l) for l in (out / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if e.get("event") == "epoch"]
    assert len(epochs) == 2 and all(0.0 <= e["val_aupr"] <= 1.0 for e in epochs)


def test_bad_arguments_are_one_line_errors(tmp_path, capsys):
    from training.recipes.exudates import main

    assert main(["--data", str(tmp_path / "none"), "--out", str(tmp_path / "m"), "--epochs", "1"]) == 2
    err = capsys.readouterr().err.strip().splitlines()
    assert len(err) == 1 and "not a folder" in err[0]
    with pytest.raises(SystemExit) as e:
        main(["--data", str(tmp_path), "--out", str(tmp_path / "m"), "--epochs", "1", "--patch-size", "40"])
    assert e.value.code == 2


def test_fine_tuning_on_other_images_than_the_parents_splits_afresh(ex_folder, tmp_path):
    """The shipped model names IDRiD validation images; a clinic's own folder has none of them."""
    from training.data import gather_records, parents_held_out

    records = gather_records([ex_folder])
    assert parents_held_out({"validation_images": ["IDRiD_44.jpg", "IDRiD_50.jpg"]}, records) is None
    assert parents_held_out({"validation_images": ["IDRiD_02.jpg", "IDRiD_50.jpg"]}, records) == ["IDRiD_02.jpg"]
    assert parents_held_out(None, records) is None
    from training.recipes.exudates import main

    parent = tmp_path / "parent"
    common = ["--data", str(ex_folder), "--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2",
              "--patch-size", "32", "--scale", "1.0", "--base-channels", "4", "--depth", "2", "--device", "cpu", "--quiet"]
    assert main([*common, "--out", str(parent), "--val-images", "IDRiD_03.png"]) == 0
    import json

    cfg = json.loads((parent / "config.json").read_text())
    cfg["validation_images"] = ["IDRiD_99.jpg"]  # held out somewhere else
    (parent / "config.json").write_text(json.dumps(cfg))
    assert main([*common, "--out", str(tmp_path / "child"), "--init", str(parent)]) == 0
    child = json.loads((tmp_path / "child" / "config.json").read_text())
    assert child["validation_images"] and "IDRiD_99.jpg" not in child["validation_images"]
