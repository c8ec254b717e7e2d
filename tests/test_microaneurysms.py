"""Microaneurysm detection pieces: contrast enhancement, fusion, candidate refinement, PRN, triplet loss, sampling."""

import numpy as np
import pytest
import torch

from napari_retina.models.microaneurysms import (
    OFFSET, candidate_regions, fuse_maps, patches_at, refine_candidates,
)
from napari_retina.models.preprocess import subtract_local_background
from napari_retina.nets.patch_classifier import PATCH_SIZE, PatchClassifier
from training.losses import cosine_distance, triplet_cosine_loss
from training.sampling import SelectiveSampler


def _disc(h, w, centre, radius):
    yy, xx = np.mgrid[:h, :w]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def test_contrast_enhancement_on_a_hand_made_image():
    h, w = 200, 240
    fov = _disc(h, w, (100, 120), 95)
    rgb = np.zeros((h, w, 3), np.uint8)
    rgb[fov] = (150, 80, 40)  # a flat fundus
    rgb[100, 120] = (130, 60, 20)  # one dark pixel, 20 below its surround in every channel
    out = subtract_local_background(rgb, fov, sigma=10.0)
    assert out.dtype == np.uint8 and out.shape == rgb.shape
    # flat retina -> the offset, even next to the dark surround (the background is the
    # normalised blur over the field of view, so the rim does not light up)
    flat = fov & ~_disc(h, w, (100, 120), 30)
    assert np.abs(out[flat].astype(int) - int(OFFSET)).max() <= 1
    # the dot: 4 x (its value - its background) + 128; its background is barely pulled down by the
    # dot itself (weight of the centre of a sigma-10 Gaussian: 1 / (2 pi 100))
    expected = 4 * (np.array([130, 60, 20]) - (np.array([150, 80, 40]) - 20 / (2 * np.pi * 100))) + OFFSET
    np.testing.assert_allclose(out[100, 120].astype(float), np.clip(np.rint(expected), 0, 255), atol=1)
    assert (out[~fov] == OFFSET).all()


def test_contrast_enhancement_at_photograph_scale_blurs_at_a_lower_resolution_without_losing_accuracy():
    rng = np.random.default_rng(0)
    h, w = 400, 640
    fov = _disc(h, w, (200, 320), 190)
    yy, xx = np.mgrid[:h, :w]
    base = 90 + 60 * np.sin(xx / 120.0) * np.cos(yy / 150.0)  # slow illumination changes
    rgb = np.clip(np.stack([base, base * 0.6, base * 0.3], -1) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)
    rgb[~fov] = 0
    fast = subtract_local_background(rgb, fov, sigma=40.0)  # blurred at 1/8 size
    import cv2

    img, m = rgb.astype(np.float32), fov.astype(np.float32)
    bg = cv2.GaussianBlur(img * m[..., None], (0, 0), 40.0, borderType=cv2.BORDER_REFLECT) / np.maximum(
        cv2.GaussianBlur(m, (0, 0), 40.0, borderType=cv2.BORDER_REFLECT), 1e-6)[..., None]
    exact = np.clip(np.rint(4 * img - 4 * bg + OFFSET), 0, 255)
    inner = _disc(h, w, (200, 320), 170)
    assert np.abs(fast[inner].astype(float) - exact[inner]).mean() < 2.0


def test_fusion_maths():
    full = np.array([[0.0, 0.25], [1.0, 0.64]], np.float32)
    half = np.array([[0.0, 1.0], [1.0, 0.36]], np.float32)
    np.testing.assert_allclose(fuse_maps(full, half, "arithmetic"), (full + half) / 2)
    np.testing.assert_allclose(fuse_maps(full, half, "geometric"), [[0.0, 0.5], [1.0, 0.48]], atol=1e-6)
    # a half-size map is upsampled linearly to the full size first
    small = np.full((2, 3), 0.25, np.float32)
    fused = fuse_maps(np.ones((4, 6), np.float32), small, "geometric")
    assert fused.shape == (4, 6)
    np.testing.assert_allclose(fused, 0.5, atol=1e-6)
    with pytest.raises(ValueError, match="arithmetic"):
        fuse_maps(full, half, "median")


def test_patches_are_centred_on_the_candidates_and_reflected_past_the_border():
    img = np.arange(50 * 60 * 3, dtype=np.int32).reshape(50, 60, 3) % 251
    centres = np.array([[25, 30], [0, 0], [49, 59]])
    p = patches_at(img.astype(np.uint8), centres, size=129)
    assert p.shape == (3, 129, 129, 3)
    for (y, x), patch in zip(centres, p):
        np.testing.assert_array_equal(patch[64, 64], img[y, x])
    np.testing.assert_array_equal(p[1][64, 63], img[0, 1])  # one to the left of (0, 0) is its mirror


def test_the_prn_touches_only_candidate_pixels_and_scores_each_region_once():
    prob = np.zeros((60, 80), np.float32)
    prob[10:13, 10:13] = 0.8
    prob[11, 11] = 0.9  # region 1's most probable pixel
    prob[40:42, 50:53] = 0.6  # region 2
    prob[30, 5:70] = 0.3  # below the candidate threshold: left alone
    image = np.zeros((60, 80, 3), np.uint8)
    image[11, 11] = 200  # what the scorer looks at: the centre pixel of each patch
    calls = []

    def score(patches):
        calls.append(len(patches))
        return np.where(patches[:, 64, 64, 0] == 200, 1.0, 0.25)

    out, cands, scores = refine_candidates(prob, image, score, threshold=0.5)
    assert len(cands) == 2 and calls == [2]
    np.testing.assert_array_equal(cands.centres[0], [11, 11])
    np.testing.assert_allclose(sorted(scores), [0.25, 1.0])
    inside = cands.labels > 0
    np.testing.assert_array_equal(out[~inside], prob[~inside])
    np.testing.assert_allclose(out[10:13, 10:13], np.sqrt(prob[10:13, 10:13] * 1.0))
    np.testing.assert_allclose(out[40:42, 50:53], np.sqrt(0.6 * 0.25), rtol=1e-6)
    # the "rerank" rule: t + (p - t) x s, so every candidate stays at or above the candidate threshold
    rer, _, _ = refine_candidates(prob, image, score, threshold=0.5, rule="rerank")
    np.testing.assert_array_equal(rer[~inside], prob[~inside])
    np.testing.assert_allclose(rer[10:13, 10:13], prob[10:13, 10:13])  # score 1: unchanged
    np.testing.assert_allclose(rer[40:42, 50:53], 0.5 + 0.1 * 0.25, rtol=1e-6)
    assert (rer[inside] >= 0.5).all() and (out[40:42, 50:53] < 0.5).all()  # where sqrt(p x s) drops it
    with pytest.raises(ValueError, match="rule"):
        refine_candidates(prob, image, score, rule="mean")
    # no candidates: nothing is scored and nothing changes
    calls.clear()
    out2, c2, _ = refine_candidates(prob * 0.1, image, score)
    assert len(c2) == 0 and calls == [] and np.array_equal(out2, prob * 0.1)
    assert len(candidate_regions(prob, 0.5, fov=np.zeros_like(prob, bool))) == 0


def test_triplet_loss_with_cosine_distance_by_hand_and_zero_when_the_margin_is_met():
    a = torch.tensor([[1.0, 0.0], [1.0, 0.0]])
    p = torch.tensor([[0.0, 2.0], [3.0, 0.0]])  # orthogonal (d = 1); the same direction (d = 0)
    n = torch.tensor([[5.0, 0.0], [-1.0, 0.0]])  # the same direction (d = 0); opposite (d = 2)
    np.testing.assert_allclose(cosine_distance(a, p).numpy(), [1.0, 0.0], atol=1e-6)
    per = triplet_cosine_loss(a, p, n, margin=0.5, reduction="none")
    np.testing.assert_allclose(per.numpy(), [1.0 - 0.0 + 0.5, 0.0], atol=1e-6)  # the second: 0 - 2 + 0.5 < 0
    assert triplet_cosine_loss(a, p, n).item() == pytest.approx(0.75)
    assert triplet_cosine_loss(a, p, n, reduction="sum").item() == pytest.approx(1.5)
    # inside the margin: d(a, p) = 1 - cos 45 deg, d(a, n) = 1 - 1 / sqrt(5)
    per = triplet_cosine_loss(torch.tensor([[1.0, 0.0]]), torch.tensor([[1.0, 1.0]]), torch.tensor([[1.0, 2.0]]),
                              reduction="none")
    assert per.item() == pytest.approx((1 - np.sqrt(0.5)) - (1 - 1 / np.sqrt(5)) + 0.5, abs=1e-6)
    with pytest.raises(ValueError, match=r"\(N, D\)"):
        triplet_cosine_loss(a, p, n[:1])


def test_selective_sampling_draws_high_loss_negatives_more_often():
    s = SelectiveSampler(4, floor=0.1, seed=0)
    np.testing.assert_allclose(s.probabilities(), 0.25)  # nothing scored yet: uniform
    s.update([0, 1, 2, 3], [0.0, 1.0, 3.0, 0.0])
    draws = s.draw(40000)
    freq = np.bincount(draws, minlength=4) / len(draws)
    # weights max(loss, 0.1 x mean 1.0) = 0.1, 1, 3, 0.1 out of 4.2
    np.testing.assert_allclose(freq, np.array([0.1, 1.0, 3.0, 0.1]) / 4.2, atol=0.01)
    assert freq[2] > freq[1] > freq[0] > 0  # easy negatives still come back now and then
    # an unscored item counts as the mean of the scored ones
    s2 = SelectiveSampler(3, seed=1)
    s2.update([0, 1], [1.0, 3.0])
    np.testing.assert_allclose(s2.probabilities(), np.array([1.0, 3.0, 2.0]) / 6.0)
    with pytest.raises(ValueError, match="finite"):
        s2.update([0], [float("nan")])


def test_the_patch_classifier_is_small_and_a_few_cpu_steps_lower_its_loss():
    torch.manual_seed(0)
    net = PatchClassifier()
    assert net.num_parameters() * 4 < 15 * 2**20  # fits a model folder in float32
    x = torch.randn(2, 3, PATCH_SIZE, PATCH_SIZE)
    logits, emb = net(x, return_embedding=True)
    assert logits.shape == (2,) and emb.shape == (2, net.embedding_dim)
    # microaneurysm patches: a dark dot at the centre; healthy: none
    g = torch.Generator().manual_seed(1)
    base = torch.randn(12, 3, 33, 33, generator=g) * 0.2
    lesion = base[:8].clone()
    lesion[:, :, 14:19, 14:19] -= 2.0
    healthy = base[8:]
    net = PatchClassifier(widths=(8, 16, 16, 32))
    opt = torch.optim.Adam(net.parameters(), lr=3e-3)
    bce = torch.nn.BCEWithLogitsLoss()

    def loss_now():
        la, ea = net(lesion[:4], return_embedding=True)
        lp, ep = net(lesion[4:], return_embedding=True)
        ln, en = net(healthy, return_embedding=True)
        ce = bce(torch.cat([la, ln]), torch.cat([torch.ones(4), torch.zeros(4)]))
        return triplet_cosine_loss(ea, ep, en) + ce

    net.train()
    first = loss_now().item()
    for _ in range(15):
        opt.zero_grad()
        loss = loss_now()
        loss.backward()
        opt.step()
    assert loss_now().item() < 0.7 * first


@pytest.fixture
def ma_folder(tmp_path):
    """Three flat-layout images with a few dark microaneurysm dots and their masks."""
    from PIL import Image

    from conftest import blob_mask, fundus_rgb, write_palette_mask

    d = tmp_path / "ma"
    d.mkdir()
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        rgb = fundus_rgb(i)
        centres = [(int(rng.integers(25, 70)), int(rng.integers(30, 100))) for _ in range(5)]
        m = blob_mask(centres, radius=1)
        rgb[m] = (60, 20, 10)  # microaneurysms: small dark red dots
        Image.fromarray(rgb).save(d / f"IDRiD_{i:02d}.png")
        write_palette_mask(d / f"IDRiD_{i:02d}_MA.tif", m)
    return d


def test_ma_hgn_recipe_trains_on_enhanced_images_and_its_folder_maps_like_it_was_trained(ma_folder, tmp_path):
    import json

    from conftest import fundus_rgb
    from napari_retina.fundus import field_of_view_mask
    from napari_retina.models.registry import load_model
    from napari_retina.models.segmenter import network_input
    from training.__main__ import available, main

    assert "ma-hgn" in available()
    out = tmp_path / "hgn"
    rc = main(["ma-hgn", "--data", str(ma_folder), "--out", str(out), "--epochs", "2", "--samples-per-epoch", "8",
               "--batch-size", "4", "--patch-size", "32", "--scale", "1.0", "--base-channels", "4", "--depth", "2",
               "--val-images", "IDRiD_03.png", "--device", "cpu", "--quiet"])
    assert rc == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "ma-hgn" and config["lesion"] == "MA" and config["preprocess"] == "enhance"
    assert config["training"]["loss"] == "weighted BCE + soft Dice" and config["rim_margin"] == 0.0
    assert "Microaneurysm hypothesis network" in (out / "card.md").read_text()
    seg = load_model(out)
    assert seg.lesion == "MA" and seg.preprocess == "enhance"
    rgb = fundus_rgb(5)
    prob = seg.probability(rgb)
    assert prob.shape == rgb.shape[:2]
    # the network sees the enhanced image: its input differs from the plain standardised one
    fov = field_of_view_mask(rgb)
    plain, _ = network_input(rgb, fov, 1.0)
    enhanced, _ = network_input(rgb, fov, 1.0, "enhance")
    assert not np.allclose(plain, enhanced)


def test_ma_prn_recipe_trains_on_triplets_refreshes_its_sampler_and_writes_a_scorer(ma_folder, tmp_path, monkeypatch):
    import json

    from napari_retina.models.microaneurysms import PatchScorer
    from napari_retina.models.registry import load_model
    from training.__main__ import main
    from training import sampling

    refreshed = []
    orig = sampling.SelectiveSampler.update
    monkeypatch.setattr(sampling.SelectiveSampler, "update",
                        lambda self, i, l: (refreshed.append(len(i)), orig(self, i, l))[1])
    out = tmp_path / "prn"
    rc = main(["ma-prn", "--data", str(ma_folder), "--out", str(out), "--epochs", "2", "--samples-per-epoch", "6",
               "--batch-size", "3", "--widths", "4", "8", "8", "16", "--healthy-per-image", "20",
               "--refresh-every", "1", "--refresh-size", "10", "--val-images", "IDRiD_03.png", "--device", "cpu",
               "--quiet"])
    assert rc == 0
    assert refreshed == [10, 10]  # the healthy pool was scored after each epoch
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "ma-prn" and config["net"]["widths"] == [4, 8, 8, 16]
    assert "triplet" in config["training"]["loss"] and 0 <= config["training"]["val_patch_aupr"] <= 1
    scorer = load_model(out)
    assert isinstance(scorer, PatchScorer)
    p = scorer(np.full((5, 129, 129, 3), 128, np.uint8))
    assert p.shape == (5,) and ((p >= 0) & (p <= 1)).all()
    log = [json.loads(line) for line in (out / "run" / "log.jsonl").read_text().splitlines()]
    assert len([e for e in log if e.get("event") == "epoch"]) == 2


def test_the_three_networks_assemble_into_one_detector_that_segments_and_evaluates(ma_folder, tmp_path, monkeypatch):
    import json
    import subprocess
    import sys

    from conftest import fundus_rgb
    from napari_retina.fundus import field_of_view_mask as fov_of
    from napari_retina.models.microaneurysms import MicroaneurysmDetector, VARIANTS
    from napari_retina.models.registry import load_model
    from training.__main__ import main

    common = ["--data", str(ma_folder), "--epochs", "1", "--samples-per-epoch", "4", "--batch-size", "2",
              "--val-images", "IDRiD_03.png", "--device", "cpu", "--quiet"]
    for scale in ("1.0", "0.5"):
        assert main(["ma-hgn", "--out", str(tmp_path / f"hgn{scale}"), "--scale", scale, "--patch-size", "32",
                     "--base-channels", "4", "--depth", "2", *common]) == 0
    assert main(["ma-prn", "--out", str(tmp_path / "prn"), "--widths", "4", "8", "8", "16",
                 "--healthy-per-image", "10", "--refresh-size", "5", *common]) == 0
    out = tmp_path / "detector"
    assert main(["microaneurysms", "--hgn-full", str(tmp_path / "hgn1.0"), "--hgn-half", str(tmp_path / "hgn0.5"),
                 "--prn", str(tmp_path / "prn"), "--out", str(out), "--data", str(ma_folder), "--score",
                 "--quiet"]) == 0
    config = json.loads((out / "config.json").read_text())
    assert config["model"] == "microaneurysms" and config["fusion"] == "geometric" and 0 < config["threshold"] < 1
    # --score: the written folder's validation figures, the same as `evaluate ma --split val --variants` prints
    from napari_retina.cli import main as cli

    assert cli(["evaluate", "ma", "--data", str(ma_folder), "--model", str(out), "--split", "val", "--variants",
                "--out", str(tmp_path / "val.json")]) == 0
    measured = json.loads((tmp_path / "val.json").read_text())
    scores = config["validation_scores"]
    assert scores["images"] == measured["images"] == 1
    for key in ("aupr", "f1", "iou", "froc_score"):
        assert scores[key] == measured[key]
    assert scores["variants"]["hgn_1x"]["aupr"] == measured["variants"]["hgn_1x"]["aupr"]
    card = (out / "card.md").read_text()
    assert f"pixel AUPR {measured['aupr']:.3f}" in card and "{sha256}" not in card
    assert config["weights_sha256"] in card
    det = load_model(out)
    assert isinstance(det, MicroaneurysmDetector) and det.prn is not None
    rgb = fundus_rgb(5)
    maps = det.maps(rgb)
    assert set(maps) == set(VARIANTS) and all(m.shape == rgb.shape[:2] for m in maps.values())
    # the fused map, recalibrated by the logit offset chosen on the validation image
    from napari_retina.models.microaneurysms import shift_logits

    offset = config["fused_logit_offset"]
    assert isinstance(offset, float)
    raw = [shift_logits(maps[k], -offset) for k in ("hgn_1x", "hgn_0.5x")]  # every row on that scale
    # the overlay's preview while the full-scale network runs: 0-255, the recalibrated map at the overlay's scale
    import cv2

    from napari_retina.models.microaneurysms import OVERLAY_SCALE

    shots = []
    det.maps(rgb, preview=lambda m: shots.append(m.copy()), rows=())
    assert shots and shots[-1].dtype == np.uint8
    small = cv2.resize(maps["hgn_1x"], shots[-1].shape[::-1], interpolation=cv2.INTER_AREA) * 255
    inside = cv2.resize(fov_of(rgb).astype(np.uint8), shots[-1].shape[::-1], interpolation=cv2.INTER_NEAREST) > 0
    assert shots[-1].shape == tuple(round(s * OVERLAY_SCALE) for s in rgb.shape[:2])
    assert abs(float(shots[-1][inside].mean()) - float(small[inside].mean())) < 3  # 8-bit levels
    np.testing.assert_allclose(maps["geometric"], shift_logits(np.sqrt(raw[0] * raw[1]), offset), atol=1e-5)
    # without a PRN (the paper's "FCN" rows) the fused map is the detector's output
    bare = tmp_path / "bare"
    assert main(["microaneurysms", "--hgn-full", str(tmp_path / "hgn1.0"), "--hgn-half", str(tmp_path / "hgn0.5"),
                 "--out", str(bare), "--quiet"]) == 0
    fcn = load_model(bare)
    assert fcn.prn is None
    np.testing.assert_array_equal(fcn.probability(rgb), fcn.maps(rgb)["geometric"])
    only = fcn.maps(rgb, rows=())  # detection computes its own fusion only, the same numbers
    assert set(only) == {"geometric", "refined"}
    np.testing.assert_array_equal(only["refined"], fcn.maps(rgb)["refined"])
    # a PRN trained against that detector's own false positives: mined once per run, recorded in the card
    # (the untrained detector's recalibrated map stays below 0.5: its candidates are taken at its 99th
    # percentile instead, through the same mining)
    from training.recipes import ma_prn

    mine = ma_prn.hard_negative_centres
    monkeypatch.setattr(ma_prn, "hard_negative_centres", lambda fused, t, fov, ma, c, k: mine(
        fused, float(np.quantile(fused[fov], 0.99)), fov, ma, c, k))
    prn = tmp_path / "prn-hard"
    assert main(["ma-prn", "--out", str(prn), "--widths", "4", "8", "8", "16", "--healthy-per-image", "10",
                 "--refresh-size", "5", "--hard-negatives", str(bare), "--hard-per-image", "3", "--clearance", "3",
                 *common]) == 0
    mined = json.loads((prn / "run" / "hard_negatives.json").read_text())
    assert sorted(mined["centres"]) == ["IDRiD_01", "IDRiD_02", "IDRiD_03"]  # training and validation images
    assert all(len(c) <= 3 for c in mined["centres"].values())
    hard = json.loads((prn / "config.json").read_text())["training"]["hard_negatives"]
    assert hard["detector"] == json.loads((bare / "config.json").read_text())["version"]
    assert hard["training"] + hard["validation"] == sum(len(c) for c in mined["centres"].values())
    assert "Hard negatives: the candidate lesions of detector" in (prn / "card.md").read_text()
    log = [json.loads(line) for line in (prn / "run" / "log.jsonl").read_text().splitlines()]
    epochs = [e for e in log if e.get("event") == "epoch"]
    assert hard["training"] > 0 and hard["validation"] > 0
    assert 0 <= epochs[-1]["val_aupr_hard"] <= 1 and "against the hard negatives alone" in (prn / "card.md").read_text()
    # a PRN trained on that detector's own decision: its candidates touching a microaneurysm against the
    # rest (the untrained map is lifted on each image's microaneurysms and on one planted dot far from them,
    # so that both kinds exist; the mining, caching and training are the recipe's own)
    cand = ma_prn.detector_candidates

    def lifted(fused, t, fov, ma, k):
        f = fused * 0.5
        f[ma] = 0.9
        f[5:8, 5:8] = 0.8  # a false candidate at the corner, away from every dot of the fixture
        return cand(f, 0.6, np.ones_like(fov), ma, k)

    monkeypatch.setattr(ma_prn, "detector_candidates", lifted)
    prn_c = tmp_path / "prn-cand"
    assert main(["ma-prn", "--out", str(prn_c), "--widths", "4", "8", "8", "16", "--healthy-per-image", "4",
                 "--refresh-size", "5", "--candidates", str(bare), "--jitter", "2", "--rule", "rerank", *common]) == 0
    mined = json.loads((prn_c / "run" / "candidates.json").read_text())["centres"]
    assert sorted(mined) == ["IDRiD_01", "IDRiD_02", "IDRiD_03"]
    assert all(sum(m["touch"]) >= 1 and not all(m["touch"]) for m in mined.values())
    t = json.loads((prn_c / "config.json").read_text())["training"]
    assert t["candidates"]["detector"] == json.loads((bare / "config.json").read_text())["version"]
    assert t["candidates"]["validation"] == [sum(mined["IDRiD_03"]["touch"]), len(mined["IDRiD_03"]["touch"])] and 0 <= t["val_candidate_auc_rule"] <= 1
    assert t["hard_negatives"] is None and t["jitter"] == 2 and t["rule"] == "rerank"
    log = [json.loads(line) for line in (prn_c / "run" / "log.jsonl").read_text().splitlines()]
    ends = [e for e in log if e.get("event") == "epoch"]
    assert all(0 <= e["val_cand_auc"] <= 1 and 0 <= e["val_cand_auc_rule"] <= 1 for e in ends)
    assert t["val_candidate_auc_rule"] == round(max(e["val_cand_auc_rule"] for e in ends), 4)  # what stopping follows
    # a second run into the same folder mines nothing again (the detector is never run)
    from napari_retina.models.microaneurysms import MicroaneurysmDetector as Det

    monkeypatch.setattr(Det, "maps", lambda *a, **k: (_ for _ in ()).throw(AssertionError("mined again")))
    assert main(["ma-prn", "--out", str(prn_c), "--widths", "4", "8", "8", "16", "--healthy-per-image", "4",
                 "--refresh-size", "5", "--candidates", str(bare), "--rule", "rerank", *common]) == 0
    monkeypatch.undo()
    assert "Trained on the decision of detector" in (prn_c / "card.md").read_text()
    monkeypatch.setattr(ma_prn, "detector_candidates", cand)
    # the refinement changes only candidate pixels of the fused map
    same = maps["refined"] == maps["geometric"]
    assert same[maps["geometric"] < config["candidate_threshold"]].all()
    # assembled with the "rerank" rule (candidates at the untrained map's 99th percentile, so that there
    # are some): every candidate pixel stays between the candidate threshold and its map value
    fov = fov_of(rgb)
    t = float(np.quantile(maps["geometric"][fov], 0.99))
    rer = tmp_path / "detector-rerank"
    assert main(["microaneurysms", "--hgn-full", str(tmp_path / "hgn1.0"), "--hgn-half", str(tmp_path / "hgn0.5"),
                 "--prn", str(tmp_path / "prn"), "--prn-rule", "rerank", "--candidate-threshold", str(t),
                 "--logit-offset", str(offset), "--threshold", str(config["threshold"]), "--out", str(rer),
                 "--quiet"]) == 0
    assert json.loads((rer / "config.json").read_text())["prn_rule"] == "rerank"
    assert "every candidate stays one" in (rer / "card.md").read_text()
    rmaps = load_model(rer).maps(rgb)
    np.testing.assert_array_equal(rmaps["geometric"], maps["geometric"])
    cand = (maps["geometric"] >= np.float32(t)) & fov
    assert cand.any() and not np.array_equal(rmaps["refined"][cand], maps["geometric"][cand])
    assert (rmaps["refined"][cand] >= np.float32(t) - 1e-6).all()
    assert (rmaps["refined"][cand] <= maps["geometric"][cand] + 1e-6).all()
    np.testing.assert_array_equal(rmaps["refined"][~cand], maps["geometric"][~cand])
    # the same commands as for exudates: segment and evaluate ma (with the Table 2 rows)
    seg_out = tmp_path / "seg"
    r = subprocess.run([sys.executable, "-m", "napari_retina.cli", "segment", "--lesion", "MA", "--model", str(out),
                        str(ma_folder / "IDRiD_01.png"), "--out", str(seg_out)], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    assert (seg_out / "IDRiD_01_MA.tif").is_file() and (seg_out / "IDRiD_01_MA_prob.tif").is_file()
    r = subprocess.run([sys.executable, "-m", "napari_retina.cli", "evaluate", "ma", "--data", str(ma_folder),
                        "--model", str(out), "--variants"], capture_output=True, text=True)
    assert r.returncode == 0, r.stderr
    result = json.loads(r.stdout)
    assert result["lesion"] == "MA" and 0 <= result["aupr"] <= 1 and set(result["froc"]) == {
        "0.125", "0.25", "0.5", "1", "2", "4", "8"}
    assert set(result["variants"]) == set(VARIANTS)
    assert result["variants"]["refined"]["aupr"] == result["aupr"]
    # pre-annotation: candidates go into the project as single proposals; a rejected one stays out
    import shutil

    from napari_retina.io.images import read_fundus
    from napari_retina.io.project import ProjectFolder, ProjectWriter

    fresh = tmp_path / "fresh"  # an image no grader has marked: no pixels of the grader's to keep clear of
    fresh.mkdir()
    shutil.copy(ma_folder / "IDRiD_02.png", fresh / "IDRiD_09.png")

    def into_projects():
        r = subprocess.run([sys.executable, "-m", "napari_retina.cli", "segment", "--lesion", "MA", "--model", str(out),
                            "--into-projects", str(fresh / "IDRiD_09.png")], capture_output=True, text=True)
        assert r.returncode == 0, r.stderr
        return ProjectFolder(fresh / "IDRiD_09.retina")

    ann = into_projects().load()
    cands = [p for p in ann.record.proposals.values() if p.description.get("candidate")]
    assert cands
    ann.record.decide(cands[0].id, "rejected")
    rgb = read_fundus(fresh / "IDRiD_09.png")
    ProjectWriter(fresh / "IDRiD_09.retina", fresh / "IDRiD_09.png", rgb, ann.masks).write(ann.snapshot())
    again = into_projects().load()
    centres = [p.description["centre"] for p in again.record.proposals.values() if p.description.get("candidate")]
    assert cands[0].description["centre"] not in centres and len(centres) == len(cands) - 1
    assert len(again.record.decided("MA", "rejected")) == 1


def test_hard_negatives_are_the_candidates_away_from_every_microaneurysm_most_probable_first():
    from training.recipes.ma_prn import hard_negative_centres

    fused = np.zeros((60, 80), np.float32)
    ma = np.zeros((60, 80), bool)
    ma[10, 10] = True
    fused[9:12, 9:12] = 0.9  # on the microaneurysm: a true candidate
    fused[10, 16] = 0.8  # 6 px from it: within the clearance of 8
    fused[40:43, 40:42] = 0.6  # far: hard negatives, scored at their most probable pixel
    fused[41, 41] = 0.7
    fused[20, 60] = 0.95
    fused[50, 10] = 0.3  # below the threshold: no candidate
    fov = np.ones_like(ma)
    got = hard_negative_centres(fused, 0.5, fov, ma, clearance=8, limit=10)
    assert got.tolist() == [[20, 60], [41, 41]]
    assert hard_negative_centres(fused, 0.5, fov, ma, clearance=8, limit=1).tolist() == [[20, 60]]
    # with no clearance the nearby candidate is a negative too; outside the field of view nothing is
    assert [10, 16] in hard_negative_centres(fused, 0.5, fov, ma, clearance=0, limit=10).tolist()
    fov[:, 50:] = False
    assert hard_negative_centres(fused, 0.5, fov, ma, clearance=8, limit=10).tolist() == [[41, 41]]


def test_detector_candidates_are_labelled_by_whether_they_touch_a_microaneurysm_most_probable_first():
    from training.recipes.ma_prn import detector_candidates

    fused = np.zeros((60, 80), np.float32)
    ma = np.zeros((60, 80), bool)
    ma[10:12, 10:12] = True
    fused[11:14, 11:14] = 0.7  # shares the pixel (11, 11) with the microaneurysm: true
    fused[13, 13] = 0.8
    fused[12:14, 15:17] = 0.9  # one pixel away from it (diagonal-free gap): touches nothing, false
    fused[40, 40] = 0.6  # far: false
    fused[50, 10] = 0.3  # below the threshold: no candidate
    fov = np.ones_like(ma)
    got = detector_candidates(fused, 0.5, fov, ma, limit=10)
    assert got["centres"].tolist() == [[12, 15], [13, 13], [40, 40]]
    np.testing.assert_allclose(got["peaks"], [0.9, 0.8, 0.6])
    assert got["touch"].tolist() == [False, True, False]
    two = detector_candidates(fused, 0.5, fov, ma, limit=2)
    assert two["centres"].tolist() == [[12, 15], [13, 13]] and two["touch"].tolist() == [False, True]
    none = detector_candidates(np.zeros_like(fused), 0.5, fov, ma, limit=10)
    assert none["centres"].shape == (0, 2) and none["touch"].shape == (0,)


def test_jittered_training_patches_move_their_centre_by_at_most_the_jitter_and_stay_inside():
    from training.recipes.ma_prn import TripletPatches

    class Img:
        r = 3
        padded = np.pad(np.arange(20 * 30).reshape(20, 30), 3, mode="reflect")
        lesion_px = np.array([[0, 0], [10, 15]], np.int32)
        healthy_px = np.array([[19, 29]], np.int32)

        def patch(self, yx):
            y, x = int(yx[0]), int(yx[1])
            assert 0 <= y < 20 and 0 <= x < 30  # never outside the image
            return self.padded[y : y + 7, x : x + 7]

    img = Img()
    ds = TripletPatches([img], None, 10, augment=True, jitter=2)
    centre = lambda p: (int(p[3, 3]) // 30, int(p[3, 3]) % 30)
    rng = np.random.default_rng(0)
    moved = [centre(ds._at(img, [10, 15], rng)) for _ in range(200)]
    assert all(abs(y - 10) <= 2 and abs(x - 15) <= 2 for y, x in moved) and len(set(moved)) == 25
    assert {centre(ds._at(img, [0, 0], rng)) for _ in range(100)} <= {(y, x) for y in range(3) for x in range(3)}
    still = TripletPatches([img], None, 10, augment=False, jitter=2)
    assert centre(still._at(img, [10, 15], rng)) == (10, 15)
    # without jitter no random number is drawn: a seeded run draws the same triplets as before jitter existed
    before = rng.bit_generator.state
    TripletPatches([img], None, 10, augment=True, jitter=0)._at(img, [10, 15], rng)
    assert rng.bit_generator.state == before


def test_the_recipes_name_the_detectors_own_rules():
    from napari_retina.models.microaneurysms import PRN_RULES
    from training.recipes.ma_prn import PRN_RULE_NAMES
    from training.recipes.microaneurysms import RULE_WORDS

    assert set(PRN_RULE_NAMES) == set(RULE_WORDS) == set(PRN_RULES)


def test_ma_prn_refuses_a_hard_negative_folder_that_is_no_detector_in_one_line(ma_folder, tmp_path, capsys):
    from training.__main__ import main

    rc = main(["ma-prn", "--data", str(ma_folder), "--out", str(tmp_path / "prn"), "--epochs", "1",
               "--hard-negatives", str(tmp_path / "nowhere"), "--device", "cpu", "--quiet"])
    err = capsys.readouterr().err.strip().splitlines()
    assert rc == 2 and len(err) == 1 and "nowhere" in err[0]
    assert not (tmp_path / "prn" / "weights.safetensors").exists()


def _three_candidates(shape=(80, 100)):
    prob = np.zeros(shape, np.float32)
    prob[10:13, 10:13] = 0.6
    prob[11, 11] = 0.9
    prob[40:43, 50:53] = 0.7
    prob[60:62, 80:83] = 0.8
    return prob


def test_candidates_are_single_proposals_and_a_rerun_never_brings_back_a_rejected_one_nor_touches_an_accepted_one():
    from napari_retina.proposals import PixelRecord
    from napari_retina.segmentation import propose_candidates

    masks = {"MA": np.zeros((80, 100), bool)}
    masks["MA"][70:72, 5:7] = True  # painted by the grader
    record = PixelRecord(masks)
    desc = {"kind": "model", "model": "microaneurysms", "version": "a"}
    prob = _three_candidates()
    prob[70:72, 5:8] = 0.9  # the model also finds the painted one: left alone
    _, n = propose_candidates(record, "MA", prob, 0.5, desc)
    props = sorted(record.find(candidate=True), key=lambda p: -p.description["score"])
    assert n == 3 and [p.description["centre"] for p in props] == [[11, 11], [60, 80], [40, 50]]
    assert masks["MA"][40:43, 50:53].all() and masks["MA"][70:72, 5:7].all() and not masks["MA"][70:72, 7].any()
    # accept the first, reject the second: the verdicts are kept
    record.decide(props[0].id, "accepted")
    change = record.decide(props[1].id, "rejected")
    assert change is not None and not masks["MA"][60:62, 80:83].any()
    assert masks["MA"][10:13, 10:13].all() and record.hand("MA")[10:13, 10:13].all()
    assert [d["centre"] for d in record.decided("MA", "rejected")] == [[60, 80]]
    assert len(record.decided("MA", "accepted")) == 1
    # the detector runs again (new version, higher probabilities everywhere)
    _, n2 = propose_candidates(record, "MA", np.clip(prob + 0.05, 0, 1), 0.5, dict(desc, version="b"))
    live = record.find(candidate=True)
    assert n2 == 1 and [p.description["centre"] for p in live] == [[40, 50]]  # only the pending one, replaced
    assert not masks["MA"][60:62, 80:83].any()  # the rejected one stays out
    assert record.check("MA")
    # the verdicts survive a save and a reopen (the proposal table)
    table = record.table()
    again = PixelRecord({"MA": masks["MA"].copy()})
    again.restore(table, {p.id: record.arrays(p.id) for p in record.proposals.values()})
    assert again.decided("MA", "rejected") == record.decided("MA", "rejected")
    assert len(again.find(candidate=True)) == 1


def test_a_click_snaps_to_the_planted_dark_dot_and_sizes_its_disc_from_the_image():
    from napari_retina.models.microaneurysms import disc_box, lesion_under, snap_microaneurysm

    rng = np.random.default_rng(3)
    h, w = 120, 140
    rgb = np.clip(np.full((h, w, 3), (150, 90, 40), np.float32) + rng.normal(0, 2, (h, w, 3)), 0, 255).astype(np.uint8)
    yy, xx = np.mgrid[:h, :w]
    for (cy, cx), rad in (((40, 50), 8.0), ((90, 100), 4.0)):  # IDRiD-sized microaneurysms
        dot = (yy - cy) ** 2 + (xx - cx) ** 2 <= rad**2
        rgb[dot] = (90, 30, 15)
    centre, radius = snap_microaneurysm(rgb, (43.4, 47.2))  # a click a few px off the dot
    assert centre == (40, 50) and 6.0 <= radius <= 10.0
    centre2, radius2 = snap_microaneurysm(rgb, (91, 102))
    assert centre2 == (90, 100) and 2.5 <= radius2 < radius  # the smaller dot gets a smaller disc
    box, disc = disc_box(centre, radius, rgb.shape)
    assert disc.sum() > 20 and disc[centre[0] - box[0], centre[1] - box[2]]
    # a click on a lesion finds that lesion only
    mask = np.zeros((h, w), bool)
    mask[box[0] : box[1], box[2] : box[3]] = disc
    mask[5:8, 5:8] = True
    found = lesion_under(mask, (41, 51))
    assert found is not None and found[1].sum() == disc.sum()
    assert lesion_under(mask, (100, 20)) is None
    with pytest.raises(ValueError, match="outside"):
        snap_microaneurysm(rgb, (130, 5))


def test_beyond_the_candidate_cap_only_the_most_probable_regions_are_scored_and_the_rest_dropped():
    prob = np.zeros((40, 60), np.float32)
    peaks = [0.95, 0.6, 0.8, 0.7]
    for k, p in enumerate(peaks):
        prob[5 + 8 * k : 8 + 8 * k, 10:13] = p
    calls = []
    out, cands, scores = refine_candidates(prob, np.zeros((40, 60, 3), np.uint8),
                                           lambda x: (calls.append(len(x)), np.ones(len(x)))[1],
                                           threshold=0.5, max_candidates=2)
    assert calls == [2] and len(cands) == 2 and sorted(cands.peaks.tolist()) == pytest.approx([0.8, 0.95])
    assert out[5:8, 10:13].min() == pytest.approx(np.sqrt(0.95)) and out[21:24, 10:13].min() == pytest.approx(np.sqrt(0.8))
    assert not out[13:16, 10:13].any() and not out[29:32, 10:13].any()  # 0.6 and 0.7: dropped


def test_a_rerun_keeps_what_the_grader_erased_on_a_candidate():
    from napari_retina.proposals import PixelRecord
    from napari_retina.segmentation import propose_candidates

    masks = {"MA": np.zeros((80, 100), bool)}
    record = PixelRecord(masks)
    desc = {"kind": "model", "model": "microaneurysms", "version": "a"}
    prob = _three_candidates()
    propose_candidates(record, "MA", prob, 0.5, desc)
    er = np.ones((3, 3), bool)
    record.hand_edit("MA", (40, 43, 50, 53), erased=er)  # brushed out, not rejected
    assert not masks["MA"][40:43, 50:53].any()
    propose_candidates(record, "MA", prob, 0.5, dict(desc, version="b"))
    assert not masks["MA"][40:43, 50:53].any()  # still erased after the rerun
    assert masks["MA"][60:62, 80:83].all() and record.check("MA")


def test_a_click_on_a_flat_place_gets_a_disc_of_typical_size_not_the_largest():
    from napari_retina.models.microaneurysms import MA_TYPICAL_RADIUS, snap_microaneurysm

    flat = np.full((100, 100, 3), (150, 90, 40), np.uint8)
    centre, radius = snap_microaneurysm(flat, (50, 50))
    assert radius == MA_TYPICAL_RADIUS and abs(centre[0] - 50) <= 8 and abs(centre[1] - 50) <= 8


def test_each_candidate_is_scored_at_its_most_probable_pixel_the_first_on_ties():
    from scipy import ndimage

    from napari_retina.metrics import label_lesions

    rng = np.random.default_rng(0)
    prob = rng.random((60, 80)).astype(np.float32)
    cands = candidate_regions(prob, 0.7)
    labels, n = label_lesions(prob >= 0.7)
    expected = np.array(ndimage.maximum_position(prob, labels, index=np.arange(1, n + 1))).reshape(n, 2)
    assert n > 20 and (cands.centres == expected).all()
    np.testing.assert_array_equal(cands.peaks, prob[expected[:, 0], expected[:, 1]])
    flat = np.zeros((10, 10), np.float32)
    flat[2:5, 3:7] = 0.8  # one plateau: its first pixel in raster order
    assert candidate_regions(flat, 0.5).centres.tolist() == [[2, 3]]


def test_the_logit_shift_is_monotone_and_puts_the_chosen_threshold_at_one_half():
    from napari_retina.models.microaneurysms import shift_logits

    p = np.array([0.0, 0.2, 0.9, 0.99, 0.999, 1.0], np.float32)
    np.testing.assert_array_equal(shift_logits(p, 0.0), p)
    offset = float(np.log(0.99 / 0.01))  # the logit of 0.99
    q = shift_logits(p, offset)
    assert q[3] == pytest.approx(0.5, abs=1e-5) and q[0] == 0.0 and q[-1] == 1.0
    assert (np.diff(q) > 0).all()  # order kept: AUPR unchanged
    assert q[2] == pytest.approx(0.9 / (0.9 + 0.1 * 99), rel=1e-5)  # p / (p + (1 - p) e^offset)


def test_hypothesis_networks_validate_on_logit_levels_where_their_maps_crowd_near_one():
    from types import SimpleNamespace

    from training.recipes._segmenter import score_scaled
    from training.recipes.ma_hgn import MA_HGN

    # lesion pixels at 1 - 1e-5, background at 1 - 1e-3 and 0.2: one probability level (255) holds both
    # of the crowded ones, while their logits (11.5 against 6.9) lie far apart
    prob = np.full((40, 40), 0.2, np.float32)
    prob[:, :20] = 1 - 1e-3
    target = np.zeros((40, 40), np.float32)
    target[5:15, 5:15] = 1.0
    prob[target > 0] = 1 - 1e-5
    im = SimpleNamespace(target=target, fov=np.ones((40, 40), bool))
    coarse = score_scaled([prob], [im])
    fine = score_scaled([prob], [im], logits=True)
    assert coarse["aupr"] < 0.5 and fine["aupr"] == pytest.approx(1.0)
    assert fine["f1"] == pytest.approx(1.0) and 1 - 1e-3 < fine["threshold"] <= 1 - 1e-5
    assert MA_HGN.val_logits


def test_assembly_refuses_score_without_data_in_one_line(tmp_path, capsys):
    from training.__main__ import main

    with pytest.raises(SystemExit) as e:
        main(["microaneurysms", "--hgn-full", str(tmp_path / "a"), "--hgn-half", str(tmp_path / "b"),
              "--out", str(tmp_path / "det"), "--score"])
    err = capsys.readouterr().err.strip().splitlines()
    assert e.value.code == 2 and len(err) == 1 and "--score" in err[0] and "--data" in err[0]
    assert not (tmp_path / "det").exists()
