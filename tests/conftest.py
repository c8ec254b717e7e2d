"""Small synthetic fundus data sets made on the fly (nothing is read from ../shared)."""

from __future__ import annotations

from pathlib import Path

import numpy as np
import pytest
from PIL import Image

H, W = 96, 128


@pytest.fixture(autouse=True)
def user_data_folder(tmp_path_factory, monkeypatch):
    """Every test gets its own napari-retina data folder (model versions, the selection): the
    user's own is never read or written, and what one test selects never leaks into another."""
    folder = tmp_path_factory.mktemp("user-data")
    monkeypatch.setenv("NAPARI_RETINA_DATA", str(folder))
    return folder


def fundus_rgb(seed: int = 0, h: int = H, w: int = W) -> np.ndarray:
    """A dark surround with an orange disc, a bright optic disc and some noise."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[:h, :w]
    disc = (yy - h / 2) ** 2 + (xx - w / 2) ** 2 <= (0.45 * h) ** 2
    img = np.zeros((h, w, 3), np.uint8)
    img[disc] = (170, 70, 30)
    od = (yy - h / 2) ** 2 + (xx - w * 0.7) ** 2 <= 36
    img[od] = (250, 220, 160)
    noise = rng.integers(0, 12, size=(h, w, 3), dtype=np.uint8)
    return np.where(disc[..., None], img + noise, img).astype(np.uint8)


def blob_mask(centres, radius=3, h: int = H, w: int = W) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    m = np.zeros((h, w), bool)
    for r, c in centres:
        m |= (yy - r) ** 2 + (xx - c) ** 2 <= radius**2
    return m


def write_palette_mask(path: Path, mask: np.ndarray) -> None:
    """An IDRiD-style 1-bit palette TIFF made with PIL."""
    im = Image.fromarray(mask.astype(np.uint8)).convert("P")
    im.putpalette([0, 0, 0, 255, 0, 0] + [0, 0, 0] * 254)
    im.save(path, compression="tiff_lzw")


def write_rgba_mask(path: Path, mask: np.ndarray) -> None:
    """The test-split form: RGBA, lesion where red is 255, alpha 255 everywhere."""
    rgba = np.zeros(mask.shape + (4,), np.uint8)
    rgba[mask, 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(path, compression="tiff_lzw")


EX_BLOBS = [(30, 40), (60, 50)]
HE_BLOBS = [(50, 90)]


@pytest.fixture
def flat_folder(tmp_path) -> Path:
    """Two images in the flat layout; the first has EX and HE masks beside it."""
    d = tmp_path / "flat"
    d.mkdir()
    for i in (1, 2):
        Image.fromarray(fundus_rgb(i)).save(d / f"IDRiD_{i:02d}.jpg", quality=95)
    write_palette_mask(d / "IDRiD_01_EX.tif", blob_mask(EX_BLOBS))
    write_palette_mask(d / "IDRiD_01_HE.tif", blob_mask(HE_BLOBS))
    return d


@pytest.fixture
def idrid_folder(tmp_path) -> Path:
    """The official IDRiD layout with a training and a testing split (RGBA masks in the latter)."""
    root = tmp_path / "IDRiD"
    imgs = root / "1. Original Images"
    gts = root / "2. All Segmentation Groundtruths"
    for split, stems in (("a. Training Set", ["IDRiD_01", "IDRiD_02"]), ("b. Testing Set", ["IDRiD_55"])):
        (imgs / split).mkdir(parents=True)
        for k, stem in enumerate(stems):
            Image.fromarray(fundus_rgb(k)).save(imgs / split / f"{stem}.jpg", quality=95)
        ex = gts / split / "3. Hard Exudates"
        ma = gts / split / "1. Microaneurysms"
        ex.mkdir(parents=True)
        ma.mkdir(parents=True)
        if split.startswith("a"):
            write_palette_mask(ex / "IDRiD_01_EX.tif", blob_mask(EX_BLOBS))
            write_palette_mask(ma / "IDRiD_02_MA.tif", blob_mask([(20, 30)], radius=1))
        else:
            write_rgba_mask(ex / "IDRiD_55_EX.tif", blob_mask(HE_BLOBS))
    return root


def pytest_collection_modifyitems(config, items):
    """Tests that need a display (a napari viewer or Qt) carry the `gui` marker: `-m "not gui"` runs
    the headless rest."""
    for item in items:
        if {"make_napari_viewer", "qtbot"} & set(getattr(item, "fixturenames", ())):
            item.add_marker(pytest.mark.gui)


@pytest.hookimpl(tryfirst=True, hookwrapper=True)
def pytest_runtest_makereport(item, call):
    # napari's make_napari_viewer fixture reads item.rep_call at teardown
    outcome = yield
    rep = outcome.get_result()
    setattr(item, f"rep_{rep.when}", rep)


def write_exudate_folder(d: Path) -> Path:
    """Three flat-layout images (IDRiD_01..03.png), each with four bright exudate blobs and their EX masks."""
    d.mkdir(parents=True, exist_ok=True)
    rng = np.random.default_rng(0)
    for i in (1, 2, 3):
        rgb = fundus_rgb(i)
        m = blob_mask([(int(rng.integers(25, 70)), int(rng.integers(30, 100))) for _ in range(4)], radius=3)
        rgb[m] = (235, 225, 120)  # exudates: bright yellow
        Image.fromarray(rgb).save(d / f"IDRiD_{i:02d}.png")
        write_palette_mask(d / f"IDRiD_{i:02d}_EX.tif", m)
    return d


def write_ma_detector(folder: Path, rgb: np.ndarray, version: str = "t-ma") -> Path:
    """A real (untrained, seeded) microaneurysm detector folder whose thresholds leave a handful of
    candidates on `rgb` (the top 0.5 % of its map inside the field of view)."""
    import torch

    from napari_retina.models.folder import write_model_folder
    from napari_retina.models.microaneurysms import MicroaneurysmDetector
    from napari_retina.nets.patch_classifier import PatchClassifier
    from napari_retina.nets.segmentation import SegmentationNet

    torch.manual_seed(0)
    hgns = []
    for _ in range(2):
        net = SegmentationNet(backbone="unet", base_channels=4, depth=2)
        with torch.no_grad():
            net.classifier.weight.mul_(40.0)  # spread the untrained map so that it has peaks
        hgns.append(net)
    prn = PatchClassifier(widths=(4, 8, 8, 16))
    part = {"input_scale": 1.0, "tile": 64, "overlap": 16, "threshold": 0.5, "lesion": "MA"}
    cfg = {"model": "microaneurysms", "lesion": "MA", "version": version, "fusion": "geometric",
           "candidate_threshold": 0.5, "threshold": 0.5, "validation_images": [],
           "hgn_full": {**part, "net": hgns[0].config()}, "hgn_half": {**part, "input_scale": 0.5, "net": hgns[1].config()},
           "prn": {"net": prn.config()}}
    det = MicroaneurysmDetector.from_networks(hgns[0], hgns[1], prn, cfg)
    prob = det.probability(rgb)
    inside = prob[prob > 0]
    cfg["threshold"] = cfg["candidate_floor"] = float(np.quantile(inside, 0.995))
    state = {f"hgn_full.{k}": v for k, v in hgns[0].state_dict().items()}
    state.update({f"hgn_half.{k}": v for k, v in hgns[1].state_dict().items()})
    state.update({f"prn.{k}": v for k, v in prn.state_dict().items()})
    return write_model_folder(folder, state, cfg, "test detector {sha256}")
