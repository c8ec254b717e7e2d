"""RefinerNet: the prototype maths by hand, the superpixel weighting, shapes, learning, config."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

torch = pytest.importorskip("torch")

from napari_retina.nets.refiner import (  # noqa: E402
    RefinerNet,
    binarise_mask,
    cosine_distance,
    masked_average_prototype,
    prototype_logits,
    superpixel_segments,
    superpixel_weighted_prototype,
)


@pytest.fixture(autouse=True)
def _seed_and_threads():
    torch.manual_seed(0)
    torch.set_num_threads(2)


def _hand_case():
    """2 channels, 2x2 pixels; the coarse mask is the top row.

    top row (lesion):   (0,0) = [2, 0], (0,1) = [0, 2]  -> p_fg = [1, 1]
    bottom row (bg):    (1,0) = [1, 0], (1,1) = [3, 0]  -> p_bg = [2, 0]
    """
    feats = torch.tensor([[[[2.0, 0.0], [1.0, 3.0]], [[0.0, 2.0], [0.0, 0.0]]]])  # (1, 2, 2, 2)
    mask = torch.tensor([[[[1.0, 1.0], [0.0, 0.0]]]])
    return feats, mask


# ---- prototype maths -------------------------------------------------------------------------------


def test_masked_average_prototypes_by_hand():
    feats, mask = _hand_case()
    p_fg = masked_average_prototype(feats, mask)
    p_bg = masked_average_prototype(feats, 1 - mask)
    # ([2,0] + [0,2]) / 2 = [1,1];  ([1,0] + [3,0]) / 2 = [2,0]
    assert torch.allclose(p_fg, torch.tensor([[1.0, 1.0]]), atol=1e-5)
    assert torch.allclose(p_bg, torch.tensor([[2.0, 0.0]]), atol=1e-5)


def test_masked_average_of_empty_mask_is_zero_not_nan():
    feats, _ = _hand_case()
    p = masked_average_prototype(feats, torch.zeros(1, 1, 2, 2))
    # 0 / (0 + eps) = 0: an empty region must not poison the logits with NaN
    assert torch.equal(p, torch.zeros(1, 2))


def test_cosine_distance_orthogonal_parallel_opposite():
    vecs = torch.tensor([[[0.0, 5.0, -2.0, 0.0]], [[3.0, 0.0, 0.0, 0.0]]]).permute(1, 0, 2)  # (1, 2, 4)
    # columns [0,3] orthogonal, [5,0] parallel, [-2,0] opposite, [0,0] zero to p = [1, 0]
    d = cosine_distance(vecs, torch.tensor([[1.0, 0.0]]))
    assert torch.allclose(d, torch.tensor([[1.0, 0.0, 2.0, 1.0]]), atol=1e-5)


def test_prototype_logits_by_hand_and_equal_to_two_way_softmax():
    feats, mask = _hand_case()
    p_fg, p_bg = torch.tensor([[1.0, 1.0]]), torch.tensor([[2.0, 0.0]])
    alpha = 2.0
    logits = prototype_logits(feats, p_fg, p_bg, alpha)
    # [2,0],[1,0],[3,0]: d_fg = 1 - 1/sqrt2, d_bg = 0 -> logit = 2 * (0 - (1 - 1/sqrt2)) = -0.585786
    # [0,2]:             d_fg = 1 - 1/sqrt2, d_bg = 1 -> logit = 2 * (1 - (1 - 1/sqrt2)) = sqrt2 = 1.414214
    a = -alpha * (1 - 1 / math.sqrt(2))
    expected = torch.tensor([[[[a, math.sqrt(2)], [a, a]]]])
    assert logits.shape == (1, 1, 2, 2)
    assert torch.allclose(logits, expected, atol=1e-5)
    d_fg, d_bg = cosine_distance(feats, p_fg), cosine_distance(feats, p_bg)
    softmax_fg = torch.softmax(torch.stack([-alpha * d_fg, -alpha * d_bg]), dim=0)[0]
    # Eq. 3's 2-class softmax is the sigmoid of the logit, so BCE-with-logits is the paper's loss
    assert torch.allclose(torch.sigmoid(logits[:, 0]), softmax_fg, atol=1e-6)


def test_binarise_mask_falls_back_per_sample_to_any_coverage():
    soft = torch.zeros(2, 1, 2, 2)
    soft[0, 0, 0, 0], soft[0, 0, 1, 1] = 0.75, 0.25  # sample 0: >= 0.5 exists
    soft[1, 0, 0, 1] = 0.25  # sample 1: a thin ellipse covers a quarter of one cell only
    hard = binarise_mask(soft)
    assert hard[0, 0].tolist() == [[1.0, 0.0], [0.0, 0.0]]
    assert hard[1, 0].tolist() == [[0.0, 1.0], [0.0, 0.0]]


# ---- superpixel weighting --------------------------------------------------------------------------


def _two_subregion_case():
    """2x4 map: coarse top row = [bg-like, bg-like, lesion, lesion], background row all [1, 0]."""
    bg, lesion = [1.0, 0.0], [0.0, 1.0]
    rows = [[bg, bg, lesion, lesion], [bg, bg, bg, bg]]
    feats = torch.tensor(rows).permute(2, 0, 1).unsqueeze(0)  # (1, 2, 2, 4)
    mask = torch.tensor([[[[1.0, 1.0, 1.0, 1.0], [0.0, 0.0, 0.0, 0.0]]]])
    segments = np.array([[[1, 1, 2, 2], [0, 0, 0, 0]]])
    return feats, mask, segments


@pytest.mark.parametrize("beta", [1.0, 10.0])
def test_superpixel_weights_are_softmax_of_background_distance(beta):
    feats, mask, segments = _two_subregion_case()
    p_bg = masked_average_prototype(feats, 1 - mask)
    p_w, weights = superpixel_weighted_prototype(feats, mask, p_bg, 20, beta, segments=segments, return_weights=True)
    # g_1 = [1,0] (d = 0 to p_bg), g_2 = [0,1] (d = 1): w = [1, e^beta] / (1 + e^beta)
    w2 = math.exp(beta) / (1 + math.exp(beta))
    assert torch.allclose(weights[0], torch.tensor([1 - w2, w2]), atol=1e-5)
    # p_weighted = w1 [1,0] + w2 [0,1]
    assert torch.allclose(p_w, torch.tensor([[1 - w2, w2]]), atol=1e-5)


def test_superpixel_weighting_moves_prototype_towards_the_unlike_subregion():
    feats, mask, segments = _two_subregion_case()
    p_bg = masked_average_prototype(feats, 1 - mask)
    p_fg = masked_average_prototype(feats, mask)
    p_w = superpixel_weighted_prototype(feats, mask, p_bg, 20, 10.0, segments=segments)
    lesion = torch.tensor([[0.0, 1.0]])
    # the plain mean is half background (d = 1 - 1/sqrt2); the weighted one nearly the lesion
    assert cosine_distance(p_w, lesion) < cosine_distance(p_fg, lesion) - 0.25
    assert cosine_distance(p_w, lesion).item() < 1e-3


def test_superpixel_weighted_prototype_is_differentiable():
    feats, mask, segments = _two_subregion_case()
    feats = feats.clone().requires_grad_(True)
    p_bg = masked_average_prototype(feats, 1 - mask)
    p_w = superpixel_weighted_prototype(feats, mask, p_bg, 20, 1.0, segments=segments)
    p_w[0, 1].backward()
    # gradient must reach the lesion pixels through pooling and weights (the segments are constant)
    assert torch.isfinite(feats.grad).all() and feats.grad[0, :, 0, 2:].abs().sum() > 0


def test_superpixel_weighted_prototype_without_superpixels_is_plain_mean():
    feats, mask, _ = _two_subregion_case()
    p_bg = masked_average_prototype(feats, 1 - mask)
    p_w = superpixel_weighted_prototype(feats, mask, p_bg, 20, 10.0, segments=np.zeros((1, 2, 4), int))
    # no superpixel inside the mask: fall back to Eq. 1 rather than a zero prototype
    assert torch.allclose(p_w, masked_average_prototype(feats, mask))


def test_superpixel_segments_inside_mask_and_feature_pure():
    feats = np.zeros((3, 16, 16))
    feats[2] = 1.0  # background
    mask = np.zeros((16, 16), bool)
    mask[3:13, 3:13] = True
    feats[:, 3:13, 3:8] = np.array([1.0, 0, 0])[:, None, None]
    feats[:, 3:13, 8:13] = np.array([0, 1.0, 0])[:, None, None]
    labels = superpixel_segments(torch.from_numpy(feats).float(), torch.from_numpy(mask), 6)
    assert labels.shape == (16, 16)
    assert (labels[~mask] == 0).all() and (labels[mask] > 0).all()
    ids = np.unique(labels[mask])
    assert 2 <= len(ids) <= 6 and ids.tolist() == list(range(1, len(ids) + 1))
    # SLIC runs on features: no superpixel straddles the two feature halves
    for i in ids:
        cols = np.nonzero(labels == i)[1]
        assert cols.max() < 8 or cols.min() >= 8


def test_superpixel_segments_never_exceed_the_count():
    rng = np.random.default_rng(0)
    yy, xx = np.mgrid[:24, :24]
    for n, r in [(5, 1.0), (5, 5.0), (20, 3.0), (20, 5.0), (20, 9.0)]:
        # noisy features make connectivity enforcement split clusters (22 of 20 at r = 3): the count must hold
        feats = rng.random((8, 24, 24))
        mask = (yy - 11.5) ** 2 + (xx - 11.5) ** 2 <= r * r
        labels = superpixel_segments(feats, mask, n)
        assert (labels[~mask] == 0).all() and (labels[mask] > 0).all()
        assert 1 <= len(np.unique(labels[mask])) <= n


def test_superpixel_segments_degenerate_masks():
    feats = np.random.default_rng(1).random((2, 4, 8, 8))
    mask = np.zeros((2, 1, 8, 8))
    mask[1, 0, 4, 4] = 1  # a one-pixel region (SLIC alone leaves it unlabelled)
    labels = superpixel_segments(feats, mask, 20)
    assert labels.shape == (2, 8, 8)
    assert not labels[0].any()
    assert labels[1, 4, 4] == 1 and labels[1].sum() == 1


# ---- the network -----------------------------------------------------------------------------------


CONFIGS = [
    dict(variant="prototype", superpixels=False),
    dict(variant="prototype", superpixels=True),
    dict(variant="baseline"),
]


@pytest.mark.parametrize("kw", CONFIGS, ids=["prototype", "superpixel", "baseline"])
@pytest.mark.parametrize("coverage", ["partial", "all", "none"])
def test_shapes_and_no_nan(kw, coverage):
    net = RefinerNet(**kw)
    image = torch.randn(2, 3, 64, 64)
    mask = torch.zeros(2, 1, 64, 64)
    if coverage == "partial":
        mask[:, :, 20:44, 16:40] = 1
    elif coverage == "all":
        mask[:] = 1
    logits = net(image, mask)
    assert logits.shape == (2, 1, 64, 64)
    # an empty foreground or background prototype must give finite logits and gradients
    assert torch.isfinite(logits).all()
    logits.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)
    net.eval()
    proba = net.predict_proba(image, mask)
    assert proba.shape == (2, 1, 64, 64) and ((proba >= 0) & (proba <= 1)).all()


def test_features_are_at_quarter_resolution():
    net = RefinerNet(base_channels=8, fused_channels=24)
    fused, soft = net.features(torch.randn(1, 3, 64, 96), torch.ones(1, 1, 64, 96))
    # the last two U-Net up blocks are removed: stride 4
    assert fused.shape == (1, 24, 16, 24) and soft.shape == (1, 1, 16, 24)


def test_superpixel_switch_at_call_time_changes_the_prototype():
    net = RefinerNet(superpixels=False).eval()
    image = torch.randn(1, 3, 64, 64)
    mask = torch.zeros(1, 1, 64, 64)
    mask[:, :, 8:56, 8:56] = 1
    plain, weighted = net(image, mask), net(image, mask, superpixels=True)
    # p_weighted replaces p_fg only when asked for
    assert torch.equal(plain, net(image, mask, superpixels=False))
    assert not torch.allclose(plain, weighted)


@pytest.mark.parametrize("superpixels", [False, True])
def test_prototype_head_runs_in_float32_under_autocast(superpixels):
    net = RefinerNet(superpixels=superpixels)
    image, mask = torch.randn(2, 3, 32, 32), torch.zeros(2, 1, 32, 32)
    mask[0, :, 8:24, 8:24] = 1
    with torch.autocast("cpu", dtype=torch.bfloat16):
        logits = net(image, mask)
    # half-precision cosine maths flushes EPS**2 to zero (NaN gradients at zero features): keep it fp32
    assert logits.dtype == torch.float32
    logits.mean().backward()
    assert all(torch.isfinite(p.grad).all() for p in net.parameters() if p.grad is not None)


def test_bad_arguments_are_refused():
    with pytest.raises(ValueError):
        RefinerNet(variant="resnet")
    with pytest.raises(ValueError):
        RefinerNet(variant="baseline", superpixels=True)
    with pytest.raises(ValueError):
        RefinerNet(variant="baseline")(torch.zeros(1, 3, 64, 64), torch.zeros(1, 1, 64, 64), superpixels=True)
    with pytest.raises(ValueError, match="multiples of 8"):
        RefinerNet()(torch.zeros(1, 3, 60, 60), torch.zeros(1, 1, 60, 60))


def _disc_task(n: int = 8, size: int = 64, seed: int = 0):
    """A bright disc (the lesion) inside a larger coarse square, on a noisy dark background."""
    g = torch.Generator().manual_seed(seed)
    yy, xx = torch.meshgrid(torch.arange(size), torch.arange(size), indexing="ij")
    images, masks, targets = [], [], []
    for _ in range(n):
        r = int(torch.randint(5, 10, (1,), generator=g))
        cy, cx = (int(v) for v in torch.randint(18, size - 18, (2,), generator=g))
        disc = ((yy - cy) ** 2 + (xx - cx) ** 2 <= r * r).float()
        m = 2 * r
        square = torch.zeros(size, size)
        square[max(cy - m, 0) : cy + m, max(cx - m, 0) : cx + m] = 1
        img = 0.3 * torch.randn(3, size, size, generator=g) - 0.5 + 1.5 * disc
        images.append(img)
        masks.append(square[None])
        targets.append(disc[None])
    return torch.stack(images), torch.stack(masks), torch.stack(targets)


def _bce_dice(logits: torch.Tensor, target: torch.Tensor) -> torch.Tensor:
    bce = torch.nn.functional.binary_cross_entropy_with_logits(logits, target)
    p = torch.sigmoid(logits)
    dice = 1 - (2 * (p * target).sum() + 1) / (p.sum() + target.sum() + 1)
    return bce + dice


@pytest.mark.parametrize("kw", CONFIGS, ids=["prototype", "superpixel", "baseline"])
def test_a_few_training_steps_lower_the_loss(kw):
    image, mask, target = _disc_task()
    net = RefinerNet(**kw)
    opt = torch.optim.Adam(net.parameters(), lr=1e-3)
    losses = []
    for _ in range(30):
        loss = _bce_dice(net(image, mask), target)
        opt.zero_grad()
        loss.backward()
        opt.step()
        losses.append(loss.item())
    # the net learns to keep the disc and drop the rest of the coarse square
    assert losses[-1] < 0.8 * losses[0], losses


def test_config_round_trip_builds_the_same_architecture():
    net = RefinerNet(base_channels=8, depth=5, fused_channels=32, variant="baseline", alpha=5.0, beta=3.0)
    cfg = json.loads(json.dumps(net.config()))  # what config.json stores
    again = RefinerNet.from_config(cfg)
    assert again.config() == net.config()
    again.load_state_dict(net.state_dict(), strict=True)
    net.eval(), again.eval()
    image, mask = torch.randn(1, 3, 32, 32), torch.ones(1, 1, 32, 32)
    assert torch.equal(net(image, mask), again(image, mask))
    # a different architecture must not load: the round trip is what makes them match
    with pytest.raises(RuntimeError):
        RefinerNet.from_config({**cfg, "depth": 4}).load_state_dict(net.state_dict(), strict=True)


def test_config_keeps_every_init_argument():
    kw = dict(base_channels=4, depth=3, fused_channels=8, variant="prototype", alpha=7.0,
              superpixels=True, n_superpixels=9, beta=2.5, smooth_logits=True)
    assert RefinerNet(**kw).config() == kw


def test_logit_smoothing_removes_the_period_two_grid_and_keeps_the_rest():
    from napari_retina.nets.refiner import smooth_quarter_logits

    yy, xx = torch.meshgrid(torch.arange(16.0), torch.arange(16.0), indexing="ij")
    ramp = 0.1 * xx - 0.05 * yy  # a smooth field: kept as it is away from the border
    grid = 0.7 * ((-1.0) ** (yy + xx)) + 0.4 * ((-1.0) ** xx)  # what a stride-2 decoder leaves
    out = smooth_quarter_logits((ramp + grid)[None, None])[0, 0]
    torch.testing.assert_close(out[1:-1, 1:-1], ramp[1:-1, 1:-1], atol=1e-6, rtol=0)
