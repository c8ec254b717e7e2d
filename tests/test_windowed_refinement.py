"""Large ellipses are refined window by window at the training scale, with no seams."""

from __future__ import annotations

import numpy as np
import torch
import torch.nn.functional as F

from conftest import fundus_rgb
from napari_retina.io.ellipses import Ellipse, rasterize_ellipse
from napari_retina.models.patches import PatchGeometry, blend_weights, needs_windows, window_plan
from napari_retina.models.refiner import EllipseRefiner
from napari_retina.nets.refiner import RefinerNet


class LocalFeaturesNet(RefinerNet):
    """A RefinerNet whose features are one fixed 3x3 convolution then 4x4 average pooling (local)."""

    def __init__(self):
        super().__init__(base_channels=4, fused_channels=8)
        g = torch.Generator().manual_seed(0)
        self.register_buffer("kernel", torch.randn(8, 4, 3, 3, generator=g))

    def features(self, image, mask):
        x = F.relu(F.conv2d(torch.cat([image, mask], 1), self.kernel, padding=1))
        return F.avg_pool2d(x, 4), F.avg_pool2d(mask, 4)


def _refiner(geom: PatchGeometry) -> EllipseRefiner:
    config = {"geometry": geom.to_dict(), "threshold": 0.5, "superpixels": False}
    return EllipseRefiner.from_network(LocalFeaturesNet(), config)


def _large_fundus(h=900, w=1200, seed=3) -> np.ndarray:
    rng = np.random.default_rng(seed)
    small = fundus_rgb(seed)
    import cv2

    rgb = cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    # texture at many positions, so a seam or a periodic pattern would show as differences
    return np.clip(rgb.astype(np.int16) + rng.integers(-40, 40, rgb.shape), 0, 255).astype(np.uint8)


def test_windows_give_the_same_probabilities_as_one_pass_over_the_grid():
    geom = PatchGeometry(size=64, max_scale=2.0, window_overlap=16, window_context=8)
    refiner = _refiner(geom)
    rgb = _large_fundus()
    e = Ellipse("EX", (610.0, 440.0), (300.0, 170.0), 25.0)
    assert needs_windows(e, geom)
    plan = window_plan(e, geom)
    assert len({y for y, _ in plan.origins}) >= 3 and len({x for _, x in plan.origins}) >= 3
    # exactly the training scale: max_scale full-resolution pixels per network pixel
    assert np.isclose(np.hypot(*plan.m[:, 0]), 1 / geom.max_scale)

    m1, windowed = refiner.grid_probability(rgb, e)
    m2, one_pass = refiner.grid_probability(rgb, e, window=max(plan.shape))
    np.testing.assert_array_equal(m1, m2)
    assert windowed.shape == one_pass.shape == plan.shape
    np.testing.assert_allclose(windowed, one_pass, atol=1e-5)
    assert 0.05 < (one_pass >= 0.5).mean() < 0.95  # a real map, not all one value


def test_blend_weights_sum_to_one_and_ignore_each_windows_border():
    total, size, overlap, stride = 40, 16, 8, 8
    acc = np.zeros(total)
    for start in range(0, total - size + 1, stride):
        w = blend_weights(size, start, total, overlap)
        if start > 0:
            assert np.all(w[: overlap // 4] == 0)
        if start + size < total:
            assert np.all(w[-(overlap // 4):] == 0)
        acc[start : start + size] += w
    np.testing.assert_allclose(acc, 1.0)


def test_large_thin_and_tiny_ellipses_all_give_maps_inside_their_ellipse():
    geom = PatchGeometry(size=64, max_scale=2.0, window_overlap=16, window_context=8)
    refiner = _refiner(geom)
    rgb = _large_fundus()
    ellipses = [
        Ellipse("EX", (600.0, 450.0), (320.0, 160.0), 0.0),  # windows
        Ellipse("HE", (500.0, 300.0), (260.0, 1.2), 30.0),  # windows, one pixel thin
        Ellipse("MA", (200.0, 200.0), (3.0, 2.0), 0.0),  # one patch
        Ellipse("EX", (1150.0, 880.0), (200.0, 120.0), 10.0),  # windows, partly outside the image
    ]
    results = refiner.refine_each(rgb, ellipses)
    for e, r in zip(ellipses, results):
        r0, r1, c0, c1 = r.box
        assert 0 <= r0 < r1 <= rgb.shape[0] and 0 <= c0 < c1 <= rgb.shape[1]
        local = Ellipse(e.lesion, (e.center_xy[0] - c0, e.center_xy[1] - r0), e.semi_axes, e.angle_deg)
        inside = rasterize_ellipse(local, r.prob.shape)
        assert np.all(np.isfinite(r.prob)) and np.all(r.prob[~inside] == 0)
        assert r.prob[inside].max() > 0  # every ellipse, thin or tiny, gets probabilities
        # the box holds the whole ellipse (clipped to the image)
        full = rasterize_ellipse(e, rgb.shape[:2])
        assert full[r0:r1, c0:c1].sum() == full.sum()


def test_the_window_grid_leaves_the_stated_margin_with_as_few_windows_as_possible():
    from napari_retina.models.patches import ellipse_half_extent, window_overlap

    rng = np.random.default_rng(7)
    for context in (16, 32):
        geom = PatchGeometry(window_context=context)
        stride = geom.size - window_overlap(geom)
        for _ in range(200):
            a = rng.uniform(100, 900)
            e = Ellipse("HE", (2000.0, 1400.0), (a, a * rng.uniform(0.1, 1.0)), rng.uniform(-90, 90))
            plan = window_plan(e, geom)
            hx, hy = ellipse_half_extent(e)
            for length, half in ((plan.shape[1], hx), (plan.shape[0], hy)):
                span = 2 * half / geom.max_scale  # the bounding box in network pixels
                assert (length - span) / 2 >= context - 1e-6  # at least the stated margin on each side
                assert (length - stride - span) / 2 < context or length == geom.size  # one window fewer would not do
            # the grid is centred on the ellipse
            centre = plan.m @ np.array([*e.center_xy, 1.0])
            np.testing.assert_allclose(centre, [(plan.shape[1] - 1) / 2, (plan.shape[0] - 1) / 2], atol=1e-6)
    # the exudate cluster of the sample: a 16-pixel margin fits it in 2 windows where 32 needs 4
    cluster = Ellipse("EX", (2146.0, 1270.0), (324.0, 193.0), 0.0)
    assert len(window_plan(cluster, PatchGeometry(window_context=16)).origins) == 2
    assert len(window_plan(cluster, PatchGeometry(window_context=32)).origins) == 4
