"""Whole-image segmentation: model folder, tiles, `segment` files and projects, `evaluate ex`."""

import json
import subprocess
import sys

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import EX_BLOBS, H, W, blob_mask, fundus_rgb
from napari_retina.models.folder import write_model_folder
from napari_retina.models.registry import ModelFolderError, load_model
from napari_retina.models.segmenter import LesionSegmenter, network_input
from napari_retina.models.tiling import TilingCancelled
from napari_retina.nets.segmentation import SegmentationNet


def _segmenter_folder(folder, scale=0.5, tile=32, threshold=0.5, val=None):
    torch.manual_seed(0)
    net = SegmentationNet(backbone="unet", base_channels=4, depth=2)
    cfg = {"model": "exudates", "lesion": "EX", "version": "t-ex", "net": net.config(), "input_scale": scale,
           "tile": tile, "overlap": 16, "threshold": threshold}
    if val is not None:
        cfg["validation_images"] = val
    return write_model_folder(folder, net.state_dict(), cfg, "test exudates\n\nSHA-256: {sha256}\n")


def _median_threshold(seg, rgb) -> float:
    """A threshold at which the untrained net claims about half the field of view."""
    prob = seg.probability(rgb)
    return float(np.median(prob[prob > 0]))


@pytest.fixture(scope="module")
def model_dir(tmp_path_factory):
    return _segmenter_folder(tmp_path_factory.mktemp("ex") / "m")


def test_the_registry_loads_a_segmenter_and_refuses_changed_weights(model_dir, tmp_path):
    import shutil

    seg = load_model(model_dir)
    assert isinstance(seg, LesionSegmenter) and seg.lesion == "EX" and seg.scale == 0.5
    bad = tmp_path / "bad"
    shutil.copytree(model_dir, bad)
    w = bad / "weights.safetensors"
    w.write_bytes(w.read_bytes()[:-2] + b"\x01\x02")
    with pytest.raises(ModelFolderError, match="checksum"):
        load_model(bad)


def test_network_input_is_standardised_inside_the_field_of_view_only():
    rgb = fundus_rgb(3)
    fov = np.zeros(rgb.shape[:2], bool)
    fov[10:80, 20:110] = True
    x, small = network_input(rgb, fov, 0.5)
    assert x.shape == (3, H // 2, W // 2) and small.shape == (H // 2, W // 2)
    inside = x[:, small]
    np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-4)
    np.testing.assert_allclose(inside.std(axis=1), 1.0, atol=1e-3)
    assert not x[:, ~small].any()


def test_network_input_statistics_stay_exact_over_a_full_size_photograph():
    # 12 megapixels as a full-scale network sees them: a float32 running sum drifts by percents here
    rng = np.random.default_rng(0)
    rgb = np.clip(rng.normal((162, 89, 23), (28, 23, 11), (2848, 4288, 3)), 0, 255).astype(np.uint8)
    fov = np.ones(rgb.shape[:2], bool)
    fov[:, :300] = False
    x, small = network_input(rgb, fov, 1.0)
    inside = x[:, small].astype(np.float64)
    np.testing.assert_allclose(inside.mean(axis=1), 0.0, atol=1e-3)
    np.testing.assert_allclose(inside.std(axis=1), 1.0, atol=1e-3)


def test_the_map_is_full_size_zero_outside_the_field_of_view_and_tiled_like_one_pass(model_dir):
    seg = load_model(model_dir)
    rgb = fundus_rgb(4)
    fov = np.zeros(rgb.shape[:2], bool)
    fov[8:90, 8:120] = True
    calls = []
    prob = seg.probability(rgb, fov, progress=lambda k, n: calls.append((k, n)))
    assert prob.shape == (H, W) and prob.dtype == np.float32
    assert not prob[~fov].any() and (prob[fov] > 0).all() and prob.max() <= 1
    assert calls and calls[-1][0] == calls[-1][1] > 1  # several tiles, all reported
    # one window over the whole working image: the blended tiles agree away from borders
    seg.tile = 64
    whole = seg.probability(rgb, fov)
    assert np.abs(whole - prob)[20:-20, 20:-20].max() < 0.05


def test_cancel_stops_between_tiles(model_dir):
    seg = load_model(model_dir)
    done = []
    with pytest.raises(TilingCancelled):
        seg.probability(fundus_rgb(1), progress=lambda k, n: done.append(k), cancelled=lambda: bool(done))
    assert len(done) == 1


def test_segment_writes_mask_and_probability_and_goes_on_after_a_bad_image(model_dir, flat_folder, tmp_path):
    (flat_folder / "broken.jpg").write_bytes(b"\xff\xd8\xff not a jpeg")
    out = tmp_path / "out"
    t = round(_median_threshold(load_model(model_dir), fundus_rgb(1)), 4)
    r = subprocess.run(
        [sys.executable, "-m", "napari_retina.cli", "segment", "--lesion", "EX", str(flat_folder),
         "--out", str(out), "--model", str(model_dir), "--threshold", str(t)],
        capture_output=True, text=True,
    )
    assert r.returncode == 2, r.stderr
    lines = r.stderr.strip().splitlines()
    assert len(lines) == 4 and "broken.jpg: error" in lines[0] and "1 of 3 images failed" in lines[-1]
    from napari_retina.io.masks import read_mask

    for stem in ("IDRiD_01", "IDRiD_02"):
        prob = np.asarray(Image.open(out / f"{stem}_EX_prob.tif"))
        mask = read_mask(out / f"{stem}_EX.tif")
        assert prob.dtype == np.uint8 and prob.shape == (H, W) and mask.shape == (H, W)
        assert 0 < mask.sum() < mask.size
        # the mask is exactly the stored map at the threshold (the rule evaluation uses)
        np.testing.assert_array_equal(mask, prob >= int(np.ceil(t * 255)))
        with Image.open(out / f"{stem}_EX.tif") as im:
            assert im.mode == "1" or im.mode == "P"
    # the output folder lists no probability map as a fundus image
    from napari_retina.io.datasets import open_dataset

    assert open_dataset(out) is None or all("_prob" not in r.image.name for r in open_dataset(out).records)


def test_into_projects_never_touches_the_graders_pixels_and_reruns_do_not_stack(model_dir, flat_folder):
    from napari_retina.io.datasets import open_dataset
    from napari_retina.segmentation import segment_into_project
    from napari_retina.session import open_record

    seg = load_model(model_dir)
    seg.threshold = _median_threshold(seg, fundus_rgb(1))
    rec = open_dataset(flat_folder).records[0]
    hand = blob_mask(EX_BLOBS)  # IDRiD_01_EX.tif beside the image: the grader's starting mask
    first = segment_into_project(rec, seg)
    assert first["proposed_px"] > 0
    from napari_retina.io.masks import read_mask

    # the mask file keeps the grader's pixels only: the proposals are pending, in the record
    np.testing.assert_array_equal(read_mask(flat_folder / "IDRiD_01.retina" / "IDRiD_01_EX.tif"), hand)
    again = open_record(open_dataset(flat_folder).records[0])
    assert again.from_project
    ann = again.annotation
    ex = ann.masks["EX"]
    assert (ex & hand).sum() == hand.sum() and ex.sum() > hand.sum()
    n_props = len(ann.record.find(model="exudates"))
    assert n_props >= 1
    # a second run replaces the model's unaccepted blocks instead of adding more
    segment_into_project(open_dataset(flat_folder).records[0], seg)
    ann2 = open_record(open_dataset(flat_folder).records[0]).annotation
    assert len(ann2.record.find(model="exudates")) == n_props
    np.testing.assert_array_equal(ann2.masks["EX"], ex)
    # withdrawing every proposal leaves exactly the grader's pixels
    for p in ann2.record.find(model="exudates"):
        ann2.record.withdraw(p.id)
    np.testing.assert_array_equal(ann2.masks["EX"], hand)


def test_into_projects_leaves_the_masks_empty_until_a_grader_accepts(model_dir, tmp_path):
    import csv

    from napari_retina.io.masks import read_mask
    from napari_retina.io.project import ProjectFolder

    folder = tmp_path / "fresh"
    folder.mkdir()
    Image.fromarray(fundus_rgb(1)).save(folder / "eye.png")  # no grader has marked it
    t = round(_median_threshold(load_model(model_dir), fundus_rgb(1)), 4)
    r = subprocess.run(
        [sys.executable, "-m", "napari_retina.cli", "segment", "--lesion", "EX", str(folder / "eye.png"),
         "--into-projects", "--model", str(model_dir), "--threshold", str(t)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    assert "px proposed, pending until a grader accepts them" in r.stderr
    proj = ProjectFolder(folder / "eye.retina")
    for code in ("EX", "HE", "MA", "SE", "OD"):
        assert not read_mask(proj.mask_path(code)).any(), code
    rows = {row["lesion"]: row for row in csv.DictReader((proj.path / "lesions.csv").open())}
    assert rows["EX"]["count"] == "0" and rows["EX"]["area_px"] == "0"
    ann = proj.load()
    shown = ann.masks["EX"].copy()
    assert shown.any() and not ann.confirmed("EX").any() and ann.record.find(model="exudates")
    # a grader accepts: now the mask file holds them
    ann.record.accept(lesion="EX")
    proj.save(ann)
    np.testing.assert_array_equal(read_mask(proj.mask_path("EX")), shown)


def test_evaluate_ex_scores_a_known_map_by_hand(model_dir, flat_folder):
    from napari_retina.io.datasets import open_dataset
    from napari_retina.segmentation import evaluate_segmenter

    seg = load_model(model_dir)
    gt = blob_mask(EX_BLOBS)
    perfect = {"IDRiD_01": gt.astype(np.float32) * 0.9, "IDRiD_02": np.zeros((H, W), np.float32)}
    res = evaluate_segmenter(flat_folder, seg, maps=lambda rec: perfect[rec.stem])
    assert res["images"] == 2 and res["aupr"] == pytest.approx(1.0)
    assert res["f1"] == pytest.approx(1.0) and res["iou"] == pytest.approx(1.0) and res["specificity"] == pytest.approx(1.0)
    assert res["lesion_level"]["lesion_sensitivity"] == pytest.approx(1.0) and res["froc"]["0.125"] == pytest.approx(1.0)
    # IDRiD_02 has no EX file: no lesion there, and predicting none is not scored as a failure
    assert res["per_image"][1]["f1"] is None and res["per_image_mean"]["f1"] == pytest.approx(1.0)
    # half the lesion pixels missed: recall 0.5 pooled
    half = gt.copy()
    rows = np.nonzero(gt.any(axis=1))[0]
    half[rows[: len(rows) // 2]] = False
    res2 = evaluate_segmenter(flat_folder, seg, maps=lambda rec: (half if rec.stem == "IDRiD_01" else ~gt & False).astype(np.float32))
    assert res2["recall"] == pytest.approx(half.sum() / gt.sum()) and res2["precision"] == pytest.approx(1.0)
    assert all(k == k.lower() for k in res2)


def test_evaluate_ex_cli_prints_json_with_the_challenge_keys(model_dir, flat_folder):
    r = subprocess.run(
        [sys.executable, "-m", "napari_retina.cli", "evaluate", "ex", "--data", str(flat_folder), "--model", str(model_dir)],
        capture_output=True, text=True,
    )
    assert r.returncode == 0, r.stderr
    res = json.loads(r.stdout)
    for key in ("aupr", "precision", "recall", "f1", "iou", "sensitivity", "specificity", "froc", "seconds_per_image"):
        assert key in res
    assert 0.0 <= res["aupr"] <= 1.0 and set(res["froc"]) == {"0.125", "0.25", "0.5", "1", "2", "4", "8"}


def test_no_installed_model_and_a_model_of_another_lesion_are_one_line_errors(tmp_path, flat_folder):
    r = subprocess.run(
        [sys.executable, "-m", "napari_retina.cli", "segment", "--lesion", "EX", str(flat_folder), "--out",
         str(tmp_path / "o"), "--model", str(tmp_path / "nope")],
        capture_output=True, text=True,
    )
    assert r.returncode == 2 and len(r.stderr.strip().splitlines()) == 1 and "no such model folder" in r.stderr


def test_running_the_segmenter_again_keeps_what_the_grader_rejected():
    from napari_retina.proposals import PixelRecord
    from napari_retina.segmentation import propose_map

    rng = np.random.default_rng(1)
    shape = (700, 600)  # two blocks by two
    masks = {"EX": np.zeros(shape, bool)}
    masks["EX"][10:20, 10:20] = True  # the grader's own
    record = PixelRecord(masks)
    prob = rng.random(shape).astype(np.float32)
    desc = {"kind": "model", "model": "exudates", "version": "a"}
    propose_map(record, "EX", prob, 0.5, desc)
    n = len(record.find(model="exudates"))
    assert n == 4
    # the grader erases two candidate pixels in different blocks
    spots = [(300, 100), (600, 550)]
    for r, c in spots:
        er = np.zeros((1, 1), bool)
        er[0, 0] = True
        record.hand_edit("EX", (r, r + 1, c, c + 1), erased=er)
        assert not record.masks["EX"][r, c]
    # a second run (another version, new probabilities that would claim those pixels)
    prob2 = np.clip(prob + 0.3, 0, 1)
    propose_map(record, "EX", prob2, 0.5, dict(desc, version="b"))
    assert len(record.find(model="exudates")) == n  # replaced, not stacked
    for r, c in spots:
        assert not record.masks["EX"][r, c]
    assert record.masks["EX"][10:20, 10:20].all()
    want = (prob2 >= 0.5) | masks["EX"]
    for r, c in spots:
        want[r, c] = False
    want[10:20, 10:20] = True
    np.testing.assert_array_equal(record.masks["EX"], want)


@pytest.mark.parametrize("scale", [0.5, 1.0, 0.3])  # an integer upscale (2, 1: from each block's footprint) or not
def test_blocks_of_the_map_arrive_while_it_is_made_with_their_final_values(scale, tmp_path):
    seg = load_model(_segmenter_folder(tmp_path / "m", scale=scale))
    seg.batch = 1
    rgb = fundus_rgb(4)
    events = []
    prob = seg.probability(rgb, progress=lambda k, n: events.append(("tile", k, n)),
                           on_block=lambda box, sub: events.append(("block", box, sub)), block=16)
    blocks = [e for e in events if e[0] == "block"]
    boxes = [e[1] for e in blocks]
    assert sorted(boxes) == sorted((r, min(r + 16, H), c, min(c + 16, W)) for r in range(0, H, 16) for c in range(0, W, 16))
    for _, (r0, r1, c0, c1), sub in blocks:  # exactly the finished map's values
        np.testing.assert_array_equal(sub, prob[r0:r1, c0:c1])
    # the first blocks came before the last tiles ran: a caller can show them at once
    first_block = next(i for i, e in enumerate(events) if e[0] == "block")
    tiles_after = [e for e in events[first_block:] if e[0] == "tile"]
    assert len(tiles_after) >= 2


def test_previews_follow_the_map_tile_by_tile_and_at_most_as_often_as_asked(tmp_path):
    from napari_retina.models.segmenter import probability_to_uint8

    seg = load_model(_segmenter_folder(tmp_path / "full", scale=1.0))
    seg.batch = 1
    rgb = fundus_rgb(4)
    shots, batches = [], []
    prob = seg.probability(rgb, preview=lambda m: shots.append(m.copy()), progress=lambda k, n: batches.append(k))
    assert len(shots) == len(batches) > 3  # one per batch of tiles
    filled = [int((m > 0).sum()) for m in shots]
    assert filled == sorted(filled) and filled[0] < filled[-1]
    # the last one is the whole map converted (inside the field of view: outside, the map is set to 0 at the end)
    inside = prob > 0
    np.testing.assert_array_equal(shots[-1][inside], probability_to_uint8(prob)[inside])
    few = []
    seg.probability(rgb, preview=lambda m: few.append(1), preview_every=3600.0)
    assert few == [1]  # the first tile's, then none within the hour


def test_a_run_proposes_block_by_block_finishes_like_propose_map_and_rolls_back_to_what_it_found():
    from napari_retina.proposals import PixelRecord
    from napari_retina.segmentation import RunProposals, propose_map

    rng = np.random.default_rng(2)
    shape = (700, 600)  # two blocks by two
    desc = {"kind": "model", "model": "exudates", "version": "a"}
    prob_a = rng.random(shape).astype(np.float32)
    prob_b = rng.random(shape).astype(np.float32)

    def fresh():
        masks = {"EX": np.zeros(shape, bool)}
        masks["EX"][10:20, 10:20] = True  # the grader's own
        record = PixelRecord(masks)
        propose_map(record, "EX", prob_a, 0.5, desc)  # an earlier run
        er = np.zeros((1, 1), bool)
        er[0, 0] = True
        record.hand_edit("EX", (600, 601, 550, 551), erased=er)  # the grader rejected one of its pixels
        return record

    # one block at a time, then the rest from the finished map: the same as proposing the map whole
    rec = fresh()
    run = RunProposals(rec, "EX", 0.5, dict(desc, version="b"))
    changes = run.add((512, 700, 512, 600), prob_b[512:, 512:])
    assert changes and len(rec.find(model="exudates", version="b")) == 1
    assert not rec.masks["EX"][600, 550]  # the rejection carries over to the new run
    run.finish(prob_b)
    whole = fresh()
    propose_map(whole, "EX", prob_b, 0.5, dict(desc, version="b"))
    np.testing.assert_array_equal(rec.masks["EX"], whole.masks["EX"])
    assert len(rec.find(model="exudates", version="b")) == 4 and not rec.find(version="a")
    # a run stopped half way gives back exactly what was there before
    rec = fresh()
    before = rec.masks["EX"].copy()
    run = RunProposals(rec, "EX", 0.5, dict(desc, version="b"))
    run.add((0, 512, 0, 512), prob_b[:512, :512])
    run.add((512, 700, 512, 600), prob_b[512:, 512:])
    assert not np.array_equal(rec.masks["EX"], before)
    run.roll_back()
    np.testing.assert_array_equal(rec.masks["EX"], before)
    assert len(rec.find(model="exudates", version="a")) == 4 and not rec.find(version="b")
    # the old proposals are live again: the threshold still moves them
    rec.set_threshold(0.9, model="exudates")
    assert rec.masks["EX"].sum() < before.sum() and rec.masks["EX"][10:20, 10:20].all()
    assert not rec.masks["EX"][600, 550]


def test_the_rim_margin_clears_the_aperture_edge_but_not_where_the_image_border_cuts_the_circle():
    from napari_retina.models.segmenter import inside_rim

    h, w = 200, 300
    yy, xx = np.mgrid[:h, :w]
    fov = (yy - 100) ** 2 + (xx - 150) ** 2 <= 120**2  # a circle cut by the top and bottom borders
    assert fov[0].any() and fov[-1].any()
    np.testing.assert_array_equal(inside_rim(fov, 0.0), fov)
    kept = inside_rim(fov, 0.05)  # 0.05 x 241 px wide = 12 px
    ring = fov & ((yy - 100) ** 2 + (xx - 150) ** 2 > 110**2)  # within 10 px of the edge
    assert not (kept & ring & (yy > 50) & (yy < 150)).any()  # the aperture edge is cleared
    assert kept[0, 140:160].all() and kept[-1, 140:160].all()  # the cut edges keep their retina
    first = int(np.flatnonzero(kept[100])[0])  # the circle starts at x = 30; the surround's last pixel is 29
    assert 29 + 12 <= first <= 29 + 14


def test_a_cancelled_run_keeps_what_the_grader_erased_while_it_ran():
    from napari_retina.proposals import PixelRecord
    from napari_retina.segmentation import RunProposals, propose_map

    shape = (600, 600)
    masks = {"EX": np.zeros(shape, bool)}
    record = PixelRecord(masks)
    prob = np.zeros(shape, np.float32)
    prob[100:110, 100:110] = 0.9  # an earlier run's false spot
    desc = {"kind": "model", "model": "exudates", "version": "a"}
    propose_map(record, "EX", prob, 0.5, desc)
    run = RunProposals(record, "EX", 0.5, dict(desc, version="b"))
    run.add((0, 512, 0, 512), prob[:512, :512])  # the new run reaches that block
    er = np.ones((10, 10), bool)
    record.hand_edit("EX", (100, 110, 100, 110), erased=er)  # the grader erases the spot meanwhile
    assert not masks["EX"].any()
    run.roll_back()  # then cancels
    assert not masks["EX"].any() and len(record.find(model="exudates", version="a")) == 1
