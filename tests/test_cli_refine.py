"""napari-retina refine / evaluate refine: real model folders, real files, one-line errors."""

from __future__ import annotations

import json

import numpy as np
import pytest
import torch
from PIL import Image

from conftest import blob_mask, fundus_rgb, write_palette_mask
from napari_retina import cli
from napari_retina.coarse import coarse_mask, simulate_coarse_ellipses
from napari_retina.io.ellipses import Ellipse, EllipseFile, rasterize_ellipse, save_ellipses
from napari_retina.io.masks import read_mask
from napari_retina.metrics import iou
from napari_retina.models.folder import write_model_folder
from napari_retina.nets.refiner import RefinerNet


def _model(folder, variant="prototype", val=None):
    torch.manual_seed(0)
    net = RefinerNet(base_channels=4, fused_channels=8, variant=variant)
    cfg = {"model": "refiner", "net": net.config(), "geometry": {"size": 64}, "threshold": 0.5, "version": f"test-{variant}"}
    if val is not None:
        cfg["validation_images"] = val
    return write_model_folder(folder, net.state_dict(), cfg, "test {sha256}")


@pytest.fixture
def image(tmp_path):
    p = tmp_path / "IDRiD_07.jpg"
    Image.fromarray(fundus_rgb(7)).save(p, quality=95)
    return p


def test_refine_writes_one_palette_mask_per_lesion_inside_its_ellipses(tmp_path, image, capsys):
    model = _model(tmp_path / "m")
    ex = [Ellipse("EX", (40.0, 30.0), (10.0, 6.0), 30.0), Ellipse("EX", (90.0, 60.0), (8.0, 8.0))]
    he = [Ellipse("HE", (60.0, 50.0), (12.0, 7.0), 0.0)]
    ell = tmp_path / "ellipses.json"
    save_ellipses(ell, EllipseFile(image.name, ex + he))
    for t, out in (("0.2", "out"), ("0.8", "strict")):
        rc = cli.main(["refine", str(image), "--ellipses", str(ell), "--out", str(tmp_path / out),
                       "--model", str(model), "--threshold", t])
        assert rc == 0
    files = sorted(p.name for p in (tmp_path / "out").iterdir())
    assert files == ["IDRiD_07_EX.tif", "IDRiD_07_HE.tif"]
    with Image.open(tmp_path / "out" / "IDRiD_07_EX.tif") as im:
        assert im.mode in ("1", "P") and im.size == (128, 96)
    got = read_mask(tmp_path / "out" / "IDRiD_07_EX.tif")
    union = rasterize_ellipse(ex[0], got.shape) | rasterize_ellipse(ex[1], got.shape)
    assert got.any() and not (got & ~union).any()
    strict = read_mask(tmp_path / "strict" / "IDRiD_07_EX.tif")
    assert not (strict & ~got).any()  # a higher threshold only removes pixels
    assert "IDRiD_07_HE.tif" in capsys.readouterr().out


@pytest.mark.parametrize("content, words", [
    ("{not json", "ellipses.json"),
    ('{"image": "IDRiD_07.jpg", "ellipses": [{"lesion": "XX", "center_xy": [1, 2], "semi_axes": [3, 4]}]}', "XX"),
])
def test_refine_bad_ellipse_file_is_one_line_exit_2(tmp_path, image, capsys, content, words):
    ell = tmp_path / "ellipses.json"
    ell.write_text(content)
    rc = cli.main(["refine", str(image), "--ellipses", str(ell), "--out", str(tmp_path / "out"),
                   "--model", str(_model(tmp_path / "m"))])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err
    assert not (tmp_path / "out").exists() or not any((tmp_path / "out").iterdir())


def test_refine_with_a_folder_that_is_no_model_is_one_line_exit_2(tmp_path, image, capsys):
    ell = tmp_path / "e.json"
    save_ellipses(ell, EllipseFile(image.name, [Ellipse("EX", (40.0, 30.0), (10.0, 6.0))]))
    rc = cli.main(["refine", str(image), "--ellipses", str(ell), "--out", str(tmp_path / "o"), "--model", str(tmp_path)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and "not a model folder" in err and len(err.splitlines()) == 1


@pytest.fixture
def eval_folder(tmp_path):
    d = tmp_path / "flat"
    d.mkdir()
    for i in (1, 2, 3):
        Image.fromarray(fundus_rgb(i)).save(d / f"IDRiD_{i:02d}.jpg", quality=95)
        write_palette_mask(d / f"IDRiD_{i:02d}_EX.tif", blob_mask([(30, 40 + 5 * i), (60, 80)], radius=4))
    write_palette_mask(d / "IDRiD_02_HE.tif", blob_mask([(50, 60)], radius=8))
    return d


def test_evaluate_refine_scores_every_method_and_the_initial_iou_is_the_simulators(tmp_path, eval_folder, capsys):
    model = _model(tmp_path / "proto", val=["IDRiD_02.jpg", "IDRiD_03.jpg"])
    base = _model(tmp_path / "base", variant="baseline")
    rc = cli.main(["evaluate", "refine", "--data", str(eval_folder), "--model", str(model), "--baseline", str(base),
                   "--split", "val", "--out", str(tmp_path / "r.json")])
    assert rc == 0
    result = json.loads(capsys.readouterr().out)
    assert result == json.loads((tmp_path / "r.json").read_text())
    assert result["images"] == ["IDRiD_02", "IDRiD_03"]
    table = result["iou_percent"]
    assert set(table) == {"initial", "prototype", "prototype_superpixels", "baseline"}
    # the initial row, recomputed here from the simulator and the masks
    expect = []
    for k, stem in enumerate(["IDRiD_02", "IDRiD_03"]):
        gt = read_mask(eval_folder / f"{stem}_EX.tif")
        ell = simulate_coarse_ellipses(gt, "EX", seed=k)
        expect.append(100 * iou(coarse_mask(ell, gt.shape, "EX"), gt))
    assert table["initial"]["EX"]["mean"] == pytest.approx(np.mean(expect), abs=0.01)
    assert table["initial"]["EX"]["images"] == 2 and table["initial"]["HE"]["images"] == 1
    for method in table.values():
        for v in method.values():
            assert v["mean"] is None or 0 <= v["mean"] <= 100
    lat = result["latency_ms_per_ellipse"]
    assert lat["n"] > 0 and 0 < lat["median"] <= lat["p95"]


def test_evaluate_val_split_without_named_images_is_one_line_exit_2(tmp_path, eval_folder, capsys):
    rc = cli.main(["evaluate", "refine", "--data", str(eval_folder), "--model", str(_model(tmp_path / "m")),
                   "--split", "val"])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "validation" in err


def _evaluate(capsys, *args) -> dict:
    rc = cli.main(["evaluate", "refine", *map(str, args)])
    assert rc == 0
    return json.loads(capsys.readouterr().out)


def test_evaluate_reports_every_reduction_and_size_bucket_on_an_idrid_folder(tmp_path, idrid_folder, capsys):
    model = _model(tmp_path / "proto")
    base = _model(tmp_path / "base", variant="baseline")
    result = _evaluate(capsys, "--data", idrid_folder, "--model", model, "--baseline", base)
    assert result["images"] == ["IDRiD_01", "IDRiD_02", "IDRiD_55"]
    assert result["reductions"] == [1.0, 1.5, 2.0]
    assert set(result["by_reduction"]) == set(result["by_size"]) == {"1.0", "1.5", "2.0"}
    lesions = {"MA", "SE", "EX", "HE"}
    for r, methods in result["by_reduction"].items():
        assert set(methods) == {"initial", "model", "baseline"}
        for table in methods.values():
            assert set(table) == lesions | {"average"}
            assert set(table["average"]) == {"mean", "std"}
        for method in result["by_size"][r].values():
            assert set(method) == set(result["size_buckets"]) == {"lt_32", "32_128", "gt_128"}
            for bucket in method.values():
                assert set(bucket) == lesions | {"all"}
                assert bucket["all"]["ellipses"] == sum(bucket[c]["ellipses"] for c in lesions)
    # at the main reduction, Fig. 3's rows are Table 1's: the model ships without superpixels
    assert result["by_reduction"]["1.0"]["initial"] == result["iou_percent"]["initial"]
    assert result["by_reduction"]["1.0"]["model"] == result["iou_percent"]["prototype"]
    assert result["by_reduction"]["1.0"]["baseline"] == result["iou_percent"]["baseline"]
    # every simulated ellipse falls in exactly one bucket
    for code, n in result["ellipses"].items():
        assert sum(b[code]["ellipses"] for b in result["by_size"]["1.0"]["initial"].values()) == n
    assert result["ellipses"]["EX"] == 3 and result["ellipses"]["MA"] == 1  # 2 EX blobs in IDRiD_01, 1 in IDRiD_55


def test_score_refinement_gives_the_figures_evaluate_prints(tmp_path, eval_folder, capsys):
    from napari_retina.evaluation import score_refinement
    from napari_retina.io.datasets import open_dataset
    from napari_retina.io.images import read_fundus
    from napari_retina.models.refiner import EllipseRefiner

    model = _model(tmp_path / "proto")
    result = _evaluate(capsys, "--data", eval_folder, "--model", model, "--reductions", "1.5", "--seed", 5)
    images = []
    for rec in open_dataset(eval_folder).records:
        rgb = read_fundus(rec.image)
        images.append((rec.stem, rgb, {c: read_mask(p) for c, p in rec.masks.items()}))
    scored = score_refinement(EllipseRefiner(model), images, reduction=1.5, seed=5)
    assert scored["iou_percent"]["model"] == result["by_reduction"]["1.5"]["model"]
    assert scored["iou_percent"]["initial"] == result["by_reduction"]["1.5"]["initial"]
    assert scored["by_size"]["model"] == result["by_size"]["1.5"]["model"]


@pytest.mark.parametrize("flag", [["--reductions", "none"], ["--reductions"]])
def test_evaluate_without_reductions_skips_them(tmp_path, eval_folder, capsys, flag):
    result = _evaluate(capsys, "--data", eval_folder, "--model", _model(tmp_path / "m"), "--limit", 1, *flag)
    assert result["reductions"] == [] and result["by_reduction"] == {} and result["by_size"] == {}
    assert result["iou_percent"]["initial"]["EX"]["images"] == 1


@pytest.mark.parametrize("flag, words", [
    (["--reductions", "1.0", "0.5"], "--reductions must be at least 1.0, not 0.5"),
    (["--reductions", "two"], "--reductions takes numbers"),
    (["--reduction", "nan"], "--reduction must be at least 1.0"),
])
def test_evaluate_bad_reductions_are_one_line_exit_2(tmp_path, eval_folder, capsys, flag, words):
    rc = cli.main(["evaluate", "refine", "--data", str(eval_folder), "--model", str(tmp_path), *flag])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and words in err


def test_evaluate_scores_the_lesions_of_the_model_config(tmp_path, eval_folder, capsys):
    model = _model(tmp_path / "ex")
    cfg = json.loads((model / "config.json").read_text())
    (model / "config.json").write_text(json.dumps(dict(cfg, lesions=["EX"])))
    result = _evaluate(capsys, "--data", eval_folder, "--model", model, "--reductions", "2")
    assert set(result["iou_percent"]["initial"]) == {"EX", "average"}
    assert set(result["by_size"]["2.0"]["model"]["lt_32"]) == {"EX", "all"}
    assert result["ellipses"] == {"EX": 6}  # two blobs in each of the three images
    (model / "config.json").write_text(json.dumps(dict(cfg, lesions=["EX", "XX"])))
    rc = cli.main(["evaluate", "refine", "--data", str(eval_folder), "--model", str(model)])
    err = capsys.readouterr().err.strip()
    assert rc == 2 and len(err.splitlines()) == 1 and "XX" in err
