"""Patch geometry: ellipse -> patch -> back, shared by training and inference."""

import numpy as np
import pytest

from napari_retina.io.ellipses import Ellipse, rasterize_ellipse
from napari_retina.models.patches import (
    PatchGeometry,
    coarse_patch,
    paste_max,
    patch_transform,
    warp_image,
    warp_mask,
)


def _iou(a, b):
    return (a & b).sum() / max((a | b).sum(), 1)


@pytest.mark.parametrize("rot, scale, shift", [(0, 1.0, (0, 0)), (35, 1.2, (0.1, -0.05)), (-70, 0.9, (0, 0))])
def test_coarse_patch_matches_the_warped_full_resolution_ellipse(rot, scale, shift):
    e = Ellipse("EX", (140.0, 90.0), (30.0, 12.0), 25.0)
    shape = (200, 260)
    geom = PatchGeometry(size=128)
    m = patch_transform(e, geom, scale=scale, rotation_deg=rot, shift=shift)
    warped = warp_mask(rasterize_ellipse(e, shape), m, geom.size)
    direct = coarse_patch(e, m, geom.size)
    assert _iou(warped, direct) > 0.95


def test_plain_patch_is_centred_and_sized_by_the_context_margin():
    e = Ellipse("HE", (100.0, 60.0), (20.0, 10.0), 0.0)
    geom = PatchGeometry(size=64, context=0.6, min_side=10)
    m = patch_transform(e, geom)
    # side = 2 * 20 * 1.6 = 64 full-res px onto 64 patch px: scale 1, centre at 31.5
    np.testing.assert_allclose(m[:, :2], np.eye(2))
    np.testing.assert_allclose(m @ [100.0, 60.0, 1.0], [31.5, 31.5])
    rgb = np.zeros((120, 200, 3), np.uint8)
    rgb[60, 100] = (255, 0, 0)
    patch = warp_image(rgb, m, 64)
    # the pixel lands between the four middle patch pixels: a quarter of it on each
    lit = np.argwhere(patch[..., 0] > 0)
    assert sorted(map(tuple, lit)) == [(31, 31), (31, 32), (32, 31), (32, 32)]
    assert np.ptp(patch[31:33, 31:33, 0]) <= 1 and abs(int(patch[31, 31, 0]) - 64) <= 1


def test_paste_max_returns_the_patch_to_its_place_and_keeps_the_maximum():
    shape = (150, 180)
    e = Ellipse("SE", (90.0, 70.0), (25.0, 15.0), 40.0)
    geom = PatchGeometry(size=96)
    m = patch_transform(e, geom)
    truth = rasterize_ellipse(Ellipse("SE", (92.0, 68.0), (12.0, 6.0), 40.0), shape)
    prob_patch = warp_mask(truth, m, geom.size).astype(np.float32)
    full = np.zeros(shape, np.float32)
    full[0, 0] = 0.7  # outside the patch: untouched
    paste_max(full, prob_patch, m)
    assert _iou(full > 0.5, truth) > 0.9
    assert full[0, 0] == pytest.approx(0.7)
    # a second, weaker patch over the same place does not lower anything
    before = full.copy()
    paste_max(full, prob_patch * 0.3, m)
    np.testing.assert_array_equal(full, before)


def test_paste_max_keeps_the_result_inside_the_ellipse():
    shape = (120, 120)
    e = Ellipse("MA", (60.0, 60.0), (10.0, 10.0), 0.0)
    geom = PatchGeometry(size=64, min_side=60)
    m = patch_transform(e, geom)
    full = np.zeros(shape, np.float32)
    paste_max(full, np.ones((64, 64), np.float32), m, e)
    inside = rasterize_ellipse(e, shape)
    assert (full[~inside] == 0).all() and (full[inside] > 0.99).mean() > 0.9


def test_patches_at_the_image_border_are_padded_black():
    e = Ellipse("OD", (2.0, 3.0), (10.0, 10.0), 0.0)
    rgb = np.full((50, 50, 3), 200, np.uint8)
    patch = warp_image(rgb, patch_transform(e, PatchGeometry(size=32, min_side=40)), 32)
    assert patch[0, 0].max() == 0 and patch[-1, -1].min() == 200
