"""Fundus display aids and lesion statistics (napari_retina.fundus) and the shipped sample."""

from __future__ import annotations

import subprocess
import sys

import numpy as np
import pytest

from napari_retina.fundus import (
    count_lesions,
    enhance_display_contrast,
    field_of_view_mask,
    green_channel,
    lesion_summary,
    overlay_rgb,
)
from napari_retina.lesions import LESIONS, lesion


# ---------------------------------------------------------------- synthetic data


def _fundus_like(h, w, level=(170, 90, 40), seed=0):
    """A textured, vignetted, orange "retina" filling the whole frame, with a few dark vessels."""
    rng = np.random.default_rng(seed)
    yy, xx = np.mgrid[0:h, 0:w].astype(np.float32)
    r2 = ((yy - h / 2) / h) ** 2 + ((xx - w / 2) / w) ** 2
    shade = 1.0 - 0.9 * r2  # darker towards the rim, as a fundus camera makes it
    img = np.empty((h, w, 3), np.float32)
    for c, v in enumerate(level):
        img[..., c] = v * shade + rng.normal(0, 4, (h, w))
    for k in range(5):  # vessel-like dark lines
        x0 = int(w * (0.15 + 0.17 * k))
        img[:, x0 : x0 + 6] *= 0.75
    return np.clip(img, 0, 255).astype(np.uint8)


def _disc_image(h=900, w=1350, radius=470, level=(170, 90, 40), seed=0):
    """A fundus disc on a noisy near-black surround; the disc is cut at top and bottom, as in IDRiD."""
    rng = np.random.default_rng(seed + 1)
    img = _fundus_like(h, w, level, seed)
    yy, xx = np.mgrid[0:h, 0:w]
    disc = (yy - (h - 1) / 2) ** 2 + (xx - (w - 1) / 2) ** 2 <= radius**2
    surround = rng.integers(0, 9, (h, w, 3), dtype=np.uint8)  # JPEG-like noise around black
    img[~disc] = surround[~disc]
    return img, disc


def _iou(a, b):
    return np.logical_and(a, b).sum() / np.logical_or(a, b).sum()


# ---------------------------------------------------------------- counting


def test_diagonal_touch_is_one_lesion():
    m = np.zeros((6, 6), bool)
    m[2, 2] = m[3, 3] = True  # touching only at a corner: 4-connectivity would say 2
    assert count_lesions(m) == 1


def test_three_hand_made_blobs():
    m = np.zeros((20, 20), np.uint8)
    m[1:4, 1:4] = 1  # a square
    m[10, 2] = m[11, 3] = m[12, 4] = 1  # a diagonal streak: one lesion
    m[15:18, 12:19] = 255  # any non-zero value is lesion
    m[2, 10] = 1  # a single pixel
    m[2, 12] = 1  # separated by one background column: a separate lesion
    assert count_lesions(m) == 5
    m[2, 11] = 1  # bridge: the two single pixels become one
    assert count_lesions(m) == 4
    m[15:18, 12:19] = 0
    m[2, 10:13] = 0
    assert count_lesions(m) == 2 and count_lesions(np.zeros((5, 5))) == 0


def test_three_blobs_count_three():
    m = np.zeros((30, 30), bool)
    m[2:6, 2:6] = True
    m[10:12, 20:28] = True
    m[20, 5] = m[21, 6] = m[22, 7] = m[22, 8] = True
    assert count_lesions(m) == 3


# ---------------------------------------------------------------- summary


def test_summary_counts_areas_and_percentages():
    h, w = 10, 20  # 200 pixels
    ex = np.zeros((h, w), bool)
    ex[0:2, 0:3] = True  # 6 px
    ex[5, 10] = ex[6, 11] = True  # 2 px, one diagonal lesion
    ma = np.zeros((h, w), np.uint8)
    ma[9, 19] = 1  # 1 px
    fov = np.zeros((h, w), bool)
    fov[:, :16] = True  # 160 px
    rows = lesion_summary({"ma": ma, "EX": ex}, fov)  # codes are case-insensitive

    assert [r["lesion"] for r in rows] == [l.code for l in LESIONS]
    by = {r["lesion"]: r for r in rows}
    assert by["EX"] == {
        "lesion": "EX",
        "name": "hard exudates",
        "count": 2,
        "area_px": 8,
        "area_pct_fov": 5.0,  # 100 * 8 / 160
    }
    assert (by["MA"]["count"], by["MA"]["area_px"], by["MA"]["area_pct_fov"]) == (1, 1, 0.625)
    for code in ("HE", "SE", "OD"):
        assert (by[code]["count"], by[code]["area_px"], by[code]["area_pct_fov"]) == (0, 0, 0.0)
        assert by[code]["name"] == lesion(code).name
    assert all(isinstance(r["count"], int) and isinstance(r["area_px"], int) for r in rows)

    whole = {r["lesion"]: r for r in lesion_summary({"EX": ex}, None)}
    assert whole["EX"]["area_pct_fov"] == 4.0  # 100 * 8 / 200

    odd_fov = np.zeros((h, w), bool)
    odd_fov.flat[:3] = True
    assert lesion_summary({"MA": ma}, odd_fov)[2]["area_pct_fov"] == 33.3333  # rounded to 4 decimals


def test_summary_rejects_mismatched_shapes_and_unknown_codes():
    with pytest.raises(ValueError):
        lesion_summary({"EX": np.zeros((4, 4), bool)}, np.ones((4, 5), bool))
    with pytest.raises(ValueError):
        lesion_summary({"XX": np.zeros((4, 4), bool)}, None)


# ---------------------------------------------------------------- field of view


@pytest.mark.parametrize("level", [(170, 90, 40), (45, 22, 10)], ids=["bright", "dark"])
def test_fov_recovers_drawn_disc(level):
    img, disc = _disc_image(level=level)
    fov = field_of_view_mask(img)
    assert fov.dtype == bool and fov.shape == disc.shape
    assert _iou(fov, disc) > 0.97
    assert fov[450, 675] and not fov[450, 5]  # centre in, side surround out


def test_fov_is_all_true_without_dark_surround():
    bright = np.full((700, 1000, 3), (200, 120, 60), np.uint8)
    assert field_of_view_mask(bright).all()
    crop = _fundus_like(600, 900)  # textured, vignetted, vessels touching the border, no surround
    assert field_of_view_mask(crop).all()


def test_green_channel_is_the_green_plane():
    img = np.zeros((3, 4, 3), np.uint8)
    img[..., 0], img[..., 1], img[..., 2] = 10, np.arange(12, dtype=np.uint8).reshape(3, 4), 30
    g = green_channel(img)
    assert g.dtype == np.uint8 and g.shape == (3, 4)
    np.testing.assert_array_equal(g, np.arange(12).reshape(3, 4))


# ---------------------------------------------------------------- CLAHE


def test_clahe_keeps_shape_dtype_and_colour_and_raises_local_contrast():
    rng = np.random.default_rng(3)
    h, w = 256, 256
    img = np.empty((h, w, 3), np.uint8)
    grey = 120 + rng.normal(0, 3, (h, w))  # low-contrast texture
    grey[:, w // 2 :] = rng.uniform(20, 235, (h, w // 2))  # a busy, high-contrast half
    img[..., 0] = np.clip(grey + 40, 0, 255)
    img[..., 1] = np.clip(grey, 0, 255)
    img[..., 2] = np.clip(grey - 60, 0, 255)
    out = enhance_display_contrast(img)
    assert out.shape == img.shape and out.dtype == np.uint8
    low_in = img[:, : w // 2 - 16, 1].astype(float).std()
    low_out = out[:, : w // 2 - 16, 1].astype(float).std()
    assert low_out > 1.5 * low_in
    m = out[:, : w // 2 - 16].reshape(-1, 3).mean(0)  # still orange: red > green > blue
    assert m[0] > m[1] > m[2]
    stronger = enhance_display_contrast(img, clip_limit=8.0)
    assert stronger[:, : w // 2 - 16, 1].astype(float).std() > low_out


# ---------------------------------------------------------------- overlay


def test_overlay_keeps_single_pixel_lesion_visible():
    img = np.full((800, 1000, 3), 100, np.uint8)
    ma = np.zeros((800, 1000), bool)
    ma[503, 337] = True  # off the 10-pixel grid that nearest-neighbour sampling would read
    plain = overlay_rgb(img, {}, max_side=100)
    out = overlay_rgb(img, {"MA": ma}, alpha=0.5, max_side=100)
    assert out.shape == (80, 100, 3) and out.dtype == np.uint8
    np.testing.assert_array_equal(plain, 100)
    changed = np.argwhere((out != plain).any(axis=2))
    assert 1 <= len(changed) <= 4  # the one output pixel that covers it (two if it straddles)
    assert (abs(changed[:, 0] - 50) <= 1).all() and (abs(changed[:, 1] - 33) <= 1).all()
    r, g, b = lesion("MA").rgb
    expect = np.floor(0.5 * 100 + 0.5 * np.array([r, g, b]) + 0.5)
    np.testing.assert_array_equal(out[tuple(changed[0])], expect)


def test_overlay_size_and_smaller_lesions_on_top():
    img = np.full((300, 200, 3), 50, np.uint8)
    od = np.zeros((300, 200), bool)
    od[100:200, 50:150] = True
    ma = np.zeros((300, 200), bool)
    ma[150, 100] = True  # inside the optic disc
    out = overlay_rgb(img, {"MA": ma, "OD": od}, alpha=1.0, max_side=4096)
    assert out.shape == img.shape  # never upscaled
    np.testing.assert_array_equal(out[150, 100], lesion("MA").rgb)
    np.testing.assert_array_equal(out[120, 60], lesion("OD").rgb)
    np.testing.assert_array_equal(out[10, 10], (50, 50, 50))
    with pytest.raises(ValueError):
        overlay_rgb(img, {"MA": ma[:-1]})


# ---------------------------------------------------------------- headless and sample


def test_fundus_and_sample_modules_import_headless():
    code = (
        "import sys, napari_retina.fundus, napari_retina.sample_data;"
        "bad = [m for m in ('napari', 'qtpy', 'PyQt5', 'PyQt6', 'PySide6', 'torch') if m in sys.modules];"
        "assert not bad, bad"
    )
    subprocess.run([sys.executable, "-c", code], check=True)


def test_shipped_sample_is_complete_and_attributed():
    from PIL import Image

    from napari_retina.sample_data import IDRID_SAMPLE_STEM, idrid_sample_masks, idrid_sample_path

    jpg = idrid_sample_path()
    assert jpg.name == f"{IDRID_SAMPLE_STEM}.jpg" and jpg.is_file()
    masks = idrid_sample_masks()
    assert list(masks) == [l.code for l in LESIONS]
    with Image.open(jpg) as im:
        size = im.size
    for code, p in masks.items():
        assert p.name == f"{IDRID_SAMPLE_STEM}_{code}.tif"
        with Image.open(p) as m:
            assert m.size == size
            assert np.array(m).any()  # every lesion is present in this image
    total = jpg.stat().st_size + sum(p.stat().st_size for p in masks.values())
    assert total < 3_000_000
    attribution = (jpg.parent / "ATTRIBUTION.md").read_text()
    for needle in ("10.3390/data3030025", "10.21227/H25W98", "CC BY 4.0", "unchanged"):
        assert needle in attribution
