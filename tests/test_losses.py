"""training.losses against values computed by hand."""

from __future__ import annotations

import math

import pytest
import torch

from training.losses import bce_dice_loss, dice_loss, weighted_bce

LN2 = math.log(2.0)


def _target_with_four_ones() -> torch.Tensor:
    t = torch.zeros(1, 1, 4, 4)
    t[0, 0, 1:3, 1:3] = 1.0
    return t


def test_bce_of_zero_logits_is_ln2_whatever_the_target():
    target = _target_with_four_ones()
    assert weighted_bce(torch.zeros_like(target), target).item() == pytest.approx(LN2)


def test_bce_of_a_known_logit():
    # sigmoid(ln 3) = 3/4: the loss is -ln(3/4) for a lesion pixel and -ln(1/4) for background
    logits = torch.full((1, 2), math.log(3.0))
    target = torch.tensor([[1.0, 0.0]])
    expected = (-math.log(0.75) - math.log(0.25)) / 2
    assert weighted_bce(logits, target).item() == pytest.approx(expected, rel=1e-6)


def test_pos_weight_scales_only_the_lesion_pixels():
    # half lesion, half background, logit 0: (3 ln2 + ln2) / 2
    target = torch.tensor([[1.0, 1.0, 0.0, 0.0]])
    logits = torch.zeros_like(target)
    assert weighted_bce(logits, target, pos_weight=3.0).item() == pytest.approx(2 * LN2)
    assert weighted_bce(logits, target, pos_weight=torch.tensor(3.0)).item() == pytest.approx(2 * LN2)
    assert weighted_bce(logits, torch.zeros_like(target), pos_weight=3.0).item() == pytest.approx(LN2)


def test_bce_mask_averages_over_the_masked_pixels_only():
    logits = torch.tensor([[0.0, 100.0]])  # the second pixel is confidently wrong...
    target = torch.tensor([[1.0, 0.0]])
    mask = torch.tensor([[1.0, 0.0]])  # ...but ignored
    assert weighted_bce(logits, target, mask=mask).item() == pytest.approx(LN2)
    assert weighted_bce(logits, target).item() == pytest.approx((LN2 + 100.0) / 2, rel=1e-4)


def test_dice_at_one_half_everywhere():
    # p = 0.5 on 16 pixels, 4 lesion pixels: intersection 2, sum p 8, sum t 4
    target = _target_with_four_ones()
    logits = torch.zeros_like(target)
    assert dice_loss(logits, target, eps=0).item() == pytest.approx(1 - 4 / 12)
    assert dice_loss(logits, target).item() == pytest.approx(1 - 5 / 13)  # eps = 1


def test_dice_is_per_sample_then_averaged():
    # sample 1 as above (dice 5/13); sample 2 has no lesion: dice (0 + 1) / (8 + 0 + 1) = 1/9
    target = torch.cat([_target_with_four_ones(), torch.zeros(1, 1, 4, 4)])
    logits = torch.zeros_like(target)
    expected = ((1 - 5 / 13) + (1 - 1 / 9)) / 2
    pooled = 1 - (2 * 2 + 1) / (16 + 4 + 1)  # what a batch-pooled Dice would give instead
    got = dice_loss(logits, target).item()
    assert got == pytest.approx(expected)
    assert got != pytest.approx(pooled)


def test_dice_of_perfect_predictions_is_zero_even_without_lesions():
    target = torch.cat([_target_with_four_ones(), torch.zeros(1, 1, 4, 4)])
    logits = (target * 2 - 1) * 50.0
    assert dice_loss(logits, target).item() == pytest.approx(0.0, abs=1e-6)


def test_dice_mask_ignores_pixels_outside():
    target = _target_with_four_ones()
    logits = torch.zeros_like(target)
    mask = target.clone()  # only the 4 lesion pixels count: inter 2, sum p 2, sum t 4
    assert dice_loss(logits, target, eps=0, mask=mask).item() == pytest.approx(1 - 4 / 6)


def test_bce_dice_is_the_sum():
    target = _target_with_four_ones()
    logits = torch.zeros_like(target)
    assert bce_dice_loss(logits, target).item() == pytest.approx(LN2 + 1 - 5 / 13)
    assert bce_dice_loss(logits, target, pos_weight=3.0).item() == pytest.approx(
        (4 * 3 * LN2 + 12 * LN2) / 16 + 1 - 5 / 13
    )
    assert bce_dice_loss(logits, target, dice_weight=0.0).item() == pytest.approx(LN2)


def test_losses_are_float32_and_differentiable_from_half_precision_logits():
    target = _target_with_four_ones()
    logits = torch.zeros_like(target, dtype=torch.bfloat16, requires_grad=True)
    loss = bce_dice_loss(logits, target)
    assert loss.dtype == torch.float32
    assert loss.item() == pytest.approx(LN2 + 1 - 5 / 13, rel=1e-3)
    loss.backward()
    assert torch.isfinite(logits.grad.float()).all() and logits.grad.abs().sum() > 0


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="differ in shape"):
        dice_loss(torch.zeros(1, 1, 4, 4), torch.zeros(1, 4, 4))
    with pytest.raises(ValueError, match="differ in shape"):
        weighted_bce(torch.zeros(1, 4), torch.zeros(1, 4), mask=torch.ones(4))


# ---- global and patch-wise contrastive loss (exudates) -------------------------------

import numpy as np  # noqa: E402
from scipy import ndimage  # noqa: E402

from training.losses import (  # noqa: E402
    ExudateLoss,
    FeatureMemoryBank,
    contrastive_segmentation_loss,
    edge_aware_loss,
    patch_contour_masks,
    patch_density_labels,
    patch_density_loss,
    supervised_contrastive,
)

SQUARE = np.ones((3, 3), bool)


def _mask(h: int, w: int, *boxes: tuple[int, int, int, int]) -> torch.Tensor:
    """(1, 1, h, w) target with lesion boxes [r0, r1) x [c0, c1)."""
    t = torch.zeros(1, 1, h, w)
    for r0, r1, c0, c1 in boxes:
        t[0, 0, r0:r1, c0:c1] = 1.0
    return t


def _scipy_contours(m: np.ndarray, dilate: int, erode: int) -> tuple[np.ndarray, np.ndarray]:
    # border_value=1: the image border is not a lesion edge (the input is a crop)
    inner = m & ~ndimage.binary_erosion(m, SQUARE, iterations=erode, border_value=1)
    outer = ndimage.binary_dilation(m, SQUARE, iterations=dilate) & ~m
    return inner, outer


def test_density_labels_threshold_is_strictly_more_than_half():
    # four 16x16 cells with 0, 64 (0.25), 128 (0.5 exactly) and 192 (0.75) lesion pixels
    t = _mask(32, 32, (0, 4, 16, 32), (16, 24, 0, 16), (16, 28, 16, 32))
    labels = patch_density_labels(t, grid=2)
    assert labels.dtype == torch.bool
    assert labels[0].tolist() == [[False, False], [False, True]]
    t[0, 0, 24, 0] = 1.0  # 129 of 256: now dense
    assert patch_density_labels(t, grid=2)[0].tolist() == [[False, False], [True, True]]


def test_grid_must_divide_the_input():
    with pytest.raises(ValueError, match="multiples of grid=16"):
        patch_density_labels(torch.zeros(1, 1, 40, 32), grid=16)
    with pytest.raises(ValueError, match="multiples of grid"):
        patch_density_loss(torch.zeros(1, 2, 30, 30), torch.zeros(1, 1, 30, 30), grid=4)
    with pytest.raises(ValueError, match="target's N, H, W"):
        edge_aware_loss(torch.zeros(1, 2, 32, 32), torch.zeros(1, 1, 16, 32), grid=2)


def test_contours_of_a_dense_square_two_iterations_each():
    t = _mask(16, 16, (2, 14, 2, 14))  # 144 of 256 pixels: one dense patch
    inner, outer = patch_contour_masks(t, grid=1)
    want_inner, want_outer = _scipy_contours(t[0, 0].numpy() > 0, dilate=2, erode=2)
    np.testing.assert_array_equal(inner[0, 0].numpy() > 0, want_inner)
    np.testing.assert_array_equal(outer[0, 0].numpy() > 0, want_outer)
    assert inner.sum() == 144 - 8 * 8  # a 2-px ring inside
    assert outer.sum() == 16 * 16 - 144  # a 2-px ring outside fills the image


def test_contours_of_a_sparse_square_dilation_five_erosion_one():
    t = _mask(32, 32, (13, 19, 13, 19))  # 6x6 spot: a sparse patch
    inner, outer = patch_contour_masks(t, grid=1)
    want_inner, want_outer = _scipy_contours(t[0, 0].numpy() > 0, dilate=5, erode=1)
    np.testing.assert_array_equal(inner[0, 0].numpy() > 0, want_inner)
    np.testing.assert_array_equal(outer[0, 0].numpy() > 0, want_outer)
    assert inner.sum() == 36 - 16 and outer.sum() == 16 * 16 - 36


def test_contours_compose_per_patch_and_see_across_patch_borders():
    # cell (0,0) dense (13x16 lesion, touching the image border), the lesion runs on 4 px into
    # the sparse cell (0,1); a 2x2 spot in the sparse cell (1,1)
    t = _mask(32, 32, (0, 13, 0, 20), (24, 26, 24, 26))
    assert patch_density_labels(t, grid=2)[0].tolist() == [[True, False], [False, False]]
    inner, outer = patch_contour_masks(t, grid=2)
    m = t[0, 0].numpy() > 0
    dense_inner, dense_outer = _scipy_contours(m, dilate=2, erode=2)
    sparse_inner, sparse_outer = _scipy_contours(m, dilate=5, erode=1)
    in_dense_cell = np.zeros((32, 32), bool)
    in_dense_cell[:16, :16] = True
    np.testing.assert_array_equal(inner[0, 0].numpy() > 0, np.where(in_dense_cell, dense_inner, sparse_inner))
    np.testing.assert_array_equal(outer[0, 0].numpy() > 0, np.where(in_dense_cell, dense_outer, sparse_outer))
    # neither the patch border (columns 15|16) nor the image border (row 0) is an edge
    assert inner[0, 0, :11, 14:18].sum() == 0 and inner[0, 0, 0, :18].sum() == 0
    # below the lesion (last row 12): rows 13-14 by the dense cell's 2 iterations, row 15 not,
    # rows 16-17 by the sparse cell (1,0)'s 5 iterations, which see the lesion across the border
    assert outer[0, 0, 13:, 8].nonzero().reshape(-1).tolist() == [0, 1, 3, 4]
    assert outer[0, 0, 13:, 18].nonzero().reshape(-1).tolist() == [0, 1, 2, 3, 4]


def test_supervised_contrastive_by_hand():
    tau = 0.5
    # a=(1,0) and b=(0.6,0.8) (given at length 2) share label 0; c=(0,1) is alone in label 1
    anchors = torch.tensor([[1.0, 0.0], [1.2, 1.6], [0.0, 1.0]])
    labels = torch.tensor([0, 0, 1])
    e = lambda s: math.exp(s / tau)  # noqa: E731
    loss_a = -math.log(e(0.6) / (e(0.6) + e(0.0)))
    loss_b = -math.log(e(0.6) / (e(0.6) + e(0.8)))
    # c has no positive: skipped, not counted in the mean
    assert supervised_contrastive(anchors, labels, tau=tau).item() == pytest.approx((loss_a + loss_b) / 2, rel=1e-6)

    # an extra candidate d=(0,-3) of label 1 (e.g. from a memory bank) gives c a positive
    others, other_labels = torch.tensor([[0.0, -3.0]]), torch.tensor([1])
    loss_a = -math.log(e(0.6) / (e(0.6) + e(0.0) + e(0.0)))
    loss_b = -math.log(e(0.6) / (e(0.6) + e(0.8) + e(-0.8)))
    loss_c = -math.log(e(-1.0) / (e(-1.0) + e(0.0) + e(0.8)))
    got = supervised_contrastive(anchors, labels, others, other_labels, tau=tau)
    assert got.item() == pytest.approx((loss_a + loss_b + loss_c) / 3, rel=1e-6)


def test_supervised_contrastive_without_positives_is_an_exact_zero_in_the_graph():
    x = torch.tensor([[1.0, 0.0], [0.0, 1.0]], requires_grad=True)
    loss = supervised_contrastive(x, torch.tensor([0, 1]))
    assert loss.item() == 0.0 and loss.grad_fn is not None
    loss.backward()
    assert torch.equal(x.grad, torch.zeros_like(x))


def test_supervised_contrastive_is_float32_under_autocast():
    x = torch.randn(6, 4, dtype=torch.bfloat16, requires_grad=True)
    labels = torch.tensor([0, 0, 0, 1, 1, 1])
    with torch.autocast("cpu", dtype=torch.bfloat16):
        loss = supervised_contrastive(x, labels)
    want = supervised_contrastive(x.detach().float(), labels)
    assert loss.dtype == torch.float32 and loss.item() == pytest.approx(want.item(), rel=1e-6)


def _two_dense_two_sparse() -> torch.Tensor:
    return _mask(32, 32, (0, 16, 0, 16), (16, 32, 16, 32))  # cells (0,0), (1,1) all lesion


def test_density_loss_is_lower_when_features_separate_dense_from_sparse():
    t = _two_dense_two_sparse()
    separating = torch.cat([t, 1 - t], dim=1)  # dense patches pool to (1,0), lesion-free ones to (0,1)
    same = torch.ones(1, 2, 32, 32)  # every patch pools to (1,1)
    good = patch_density_loss(separating, t, grid=2).item()
    bad = patch_density_loss(same, t, grid=2).item()
    # each anchor: one positive, two negatives; cosines 1 vs 0 (over tau = 0.05), or all 1
    assert good == pytest.approx(math.log(1 + 2 * math.exp(-20)), abs=1e-7)
    assert bad == pytest.approx(math.log(3), rel=1e-6)
    assert good < bad
    # lesion_free="skip": the lesion-free patches drop out, each dense anchor has only its positive
    assert patch_density_loss(same, t, grid=2, lesion_free="skip").item() == pytest.approx(0.0, abs=1e-7)


def test_density_vectors_pool_lesion_pixels_only_eq2():
    # the sparse cell (0,1) holds 10 lesion pixels whose features look dense: by Eq. 2 it pools
    # only those, (1,0); the lesion-free cell (1,0) pools its whole patch, (0,1)
    t = _two_dense_two_sparse()
    t[0, 0, 0, 16:26] = 1.0
    feats = torch.cat([t, 1 - t], dim=1)
    e20 = math.exp(20)
    dense_anchor = math.log(2 + 1 / e20)  # positive at 20, negatives at 20 and 0
    sparse_lesion = math.log(1 + 2 * e20)  # positive at 0, negatives at 20, 20
    sparse_free = math.log(3)  # positive at 0, negatives at 0, 0
    want = (2 * dense_anchor + sparse_lesion + sparse_free) / 4
    assert patch_density_loss(feats, t, grid=2).item() == pytest.approx(want, rel=1e-6)


def _np_means(feats: torch.Tensor, masks: list[np.ndarray]) -> torch.Tensor:
    f = feats.detach().numpy()
    return torch.tensor(np.stack([f[i][:, m].mean(axis=1) for i, m in masks]), dtype=torch.float32)


def test_edge_loss_pools_one_edge_and_one_background_vector_per_image_eq5():
    torch.manual_seed(0)
    t = torch.cat([_mask(32, 32, (4, 10, 4, 10)), _mask(32, 32, (0, 16, 0, 16), (20, 23, 20, 23))])
    feats = torch.randn(2, 3, 32, 32)
    masks_e, masks_b = [], []
    for i, sparse_only in ((0, True), (1, False)):
        m = t[i, 0].numpy() > 0
        d_in, d_out = _scipy_contours(m, 2, 2)
        s_in, s_out = _scipy_contours(m, 5, 1)
        dense = np.zeros((32, 32), bool)
        if not sparse_only:
            dense[:16, :16] = True  # image 1: cell (0,0) is dense
        masks_e.append((i, np.where(dense, d_in, s_in)))
        masks_b.append((i, np.where(dense, d_out, s_out)))
    vectors = torch.cat([_np_means(feats, masks_e), _np_means(feats, masks_b)])
    want = supervised_contrastive(vectors, torch.tensor([1, 1, 0, 0]))  # mean over 2|B| = 4 anchors
    assert edge_aware_loss(feats, t, grid=2).item() == pytest.approx(want.item(), rel=1e-5)

    # pooling="patch": one pair per patch that has a contour there
    e_cells, b_cells = [], []
    for (i, me), (_, mb) in zip(masks_e, masks_b):
        for r in (0, 16):
            for c in (0, 16):
                cell = np.zeros((32, 32), bool)
                cell[r : r + 16, c : c + 16] = True
                e_cells += [(i, me & cell)] if (me & cell).any() else []
                b_cells += [(i, mb & cell)] if (mb & cell).any() else []
    vectors = torch.cat([_np_means(feats, e_cells), _np_means(feats, b_cells)])
    labels = torch.tensor([1] * len(e_cells) + [0] * len(b_cells))
    want = supervised_contrastive(vectors, labels)
    assert edge_aware_loss(feats, t, grid=2, pooling="patch").item() == pytest.approx(want.item(), rel=1e-5)


@pytest.mark.parametrize("kind", ["background", "lesion"])
def test_losses_are_finite_and_differentiable_without_any_edge(kind):
    torch.manual_seed(1)
    t = torch.zeros(2, 1, 32, 32) if kind == "background" else torch.ones(2, 1, 32, 32)
    for loss_fn in (
        lambda f: patch_density_loss(f, t, grid=4),
        lambda f: patch_density_loss(f, t, grid=4, lesion_free="skip"),
        lambda f: edge_aware_loss(f, t, grid=4),
        lambda f: edge_aware_loss(f, t, grid=4, pooling="patch"),
        lambda f: contrastive_segmentation_loss(f[:, :1], f, t, grid=4)[0],
    ):
        feats = torch.randn(2, 4, 32, 32, requires_grad=True)
        loss = loss_fn(feats)
        assert torch.isfinite(loss) and loss.grad_fn is not None
        loss.backward()
        assert torch.isfinite(feats.grad).all()
    feats = torch.randn(2, 4, 32, 32, requires_grad=True)
    # no contour at all (the image border is no edge): the edge loss is an exact 0
    assert edge_aware_loss(feats, t, grid=4).item() == 0.0
    if kind == "background":  # all patches sparse, pooled whole: positives only, a finite log-sum-exp
        assert patch_density_loss(feats, t, grid=4).item() > 0


def test_memory_bank_is_fifo_per_class_with_capacity_and_detached():
    bank = FeatureMemoryBank(capacity=3)
    x = torch.arange(10.0).reshape(5, 2).requires_grad_()
    bank.push(x * 1, torch.tensor([0, 0, 1, 0, 0]))
    bank.push(x[:1] * 10, torch.tensor([0]))
    feats, labels = bank.get()
    assert len(bank) == 4 and labels.tolist() == [0, 0, 0, 1]
    # class 0 saw rows 0, 1, 3, 4 and then 10 x row 0: the oldest two are gone, oldest first
    assert feats.tolist() == [[6.0, 7.0], [8.0, 9.0], [0.0, 10.0], [4.0, 5.0]]
    assert not feats.requires_grad and feats.grad_fn is None
    with torch.no_grad():
        x += 100  # the bank holds copies
    assert bank.get()[0][0].tolist() == [6.0, 7.0]
    bank.clear()
    assert len(bank) == 0 and bank.get() == (None, None)


def test_edge_loss_takes_positives_from_the_bank():
    torch.manual_seed(2)
    t = _mask(32, 32, (10, 14, 10, 14))  # one image: one edge and one background vector, no positive
    feats = torch.randn(1, 3, 32, 32, requires_grad=True)
    assert edge_aware_loss(feats, t, grid=2).item() == 0.0
    bank = FeatureMemoryBank(capacity=8)
    bank.push(torch.randn(2, 3), torch.tensor([1, 0]))  # an earlier batch's edge and background
    bank_feats, bank_labels = bank.get()
    inner, outer = _scipy_contours(t[0, 0].numpy() > 0, 5, 1)  # one sparse patch per cell
    vectors = _np_means(feats, [(0, inner), (0, outer)])
    want = supervised_contrastive(vectors, torch.tensor([1, 0]), bank_feats, bank_labels)
    loss = edge_aware_loss(feats, t, grid=2, bank=bank)
    assert loss.item() == pytest.approx(want.item(), rel=1e-5) and loss.item() > 0
    loss.backward()  # gradients reach the current batch only
    assert feats.grad.abs().sum() > 0
    assert len(bank) == 4 and bank.get()[1].tolist() == [0, 0, 1, 1]


def test_total_loss_is_the_weighted_sum_and_wbce_defaults_to_the_batch_ratio():
    torch.manual_seed(3)
    t = _two_dense_two_sparse()
    feats = torch.randn(1, 4, 32, 32)
    logits = torch.zeros_like(t)
    total, parts = contrastive_segmentation_loss(logits, feats, t, alpha=0.3, beta=0.7, grid=2)
    assert parts["global"].item() == pytest.approx(LN2)
    assert parts["density"].item() == pytest.approx(patch_density_loss(feats, t, grid=2).item())
    assert parts["edge"].item() == pytest.approx(edge_aware_loss(feats, t, grid=2).item())
    assert total.item() == pytest.approx(LN2 + 0.3 * parts["density"].item() + 0.7 * parts["edge"].item())
    # 4 lesion pixels of 16: pos_weight = 12 / 4 = 3 -> (4 * 3 ln2 + 12 ln2) / 16
    t4 = _target_with_four_ones()
    total, parts = contrastive_segmentation_loss(
        torch.zeros_like(t4), torch.randn(1, 2, 4, 4), t4, alpha=0, beta=0, global_loss="wbce", grid=1
    )
    assert total.item() == pytest.approx(1.5 * LN2) and parts["density"].item() == 0.0
    with pytest.raises(ValueError, match="pos_weight"):
        contrastive_segmentation_loss(logits, feats, t, pos_weight=2.0, grid=2)


def test_sampling_keeps_at_most_max_samples_per_class():
    t = _mask(32, 32, (0, 8, 0, 24))  # grid 4: three dense patches, thirteen sparse
    bank = FeatureMemoryBank(capacity=100)
    patch_density_loss(torch.randn(1, 2, 32, 32), t, grid=4, max_samples=2, bank=bank)
    assert bank.get()[1].tolist() == [0, 0, 1, 1]  # the anchors drawn, pushed after the loss
    bank.clear()
    patch_density_loss(torch.randn(1, 2, 32, 32), t, grid=4, max_samples=None, bank=bank)
    assert bank.get()[1].tolist() == [0] * 13 + [1] * 3


def test_adam_on_free_features_drives_the_contrastive_losses_to_their_floor():
    # Eq. 4 cannot go below log |P(i)| (all positives at cosine 1, negatives far): reaching it
    # shows the gradients pull each class together and push the classes apart
    torch.manual_seed(5)
    t = _mask(32, 32, (0, 8, 0, 24), (20, 22, 20, 23))  # three dense patches, thirteen sparse
    inner, outer = patch_contour_masks(t, grid=4)
    n_e = int((_cell_sums_np(inner[0, 0].numpy()) > 0).sum())  # edge vectors with pooling="patch"
    n_b = int((_cell_sums_np(outer[0, 0].numpy()) > 0).sum())
    density_floor = (3 * math.log(2) + 13 * math.log(12)) / 16
    edge_floor = (n_e * math.log(n_e - 1) + n_b * math.log(n_b - 1)) / (n_e + n_b)
    # one loss at a time: they pull Eq. 2's shared pixels (a sparse patch's small lesion is
    # pooled as "sparse" and as "edge") in different directions, so their sum has a higher floor
    for loss_fn, floor in (
        (lambda f: patch_density_loss(f, t, grid=4), density_floor),
        (lambda f: edge_aware_loss(f, t, grid=4, pooling="patch"), edge_floor),
    ):
        feats = torch.randn(1, 4, 32, 32, requires_grad=True)
        opt = torch.optim.Adam([feats], lr=0.1)
        losses = []
        for _ in range(40):
            loss = loss_fn(feats)
            opt.zero_grad()
            loss.backward()
            opt.step()
            losses.append(loss.item())
        assert losses[0] > floor + 1, losses
        assert losses[-1] == pytest.approx(floor, abs=0.05), losses


def _cell_sums_np(m: np.ndarray, cell: int = 8) -> np.ndarray:
    h, w = m.shape
    return m.reshape(h // cell, cell, w // cell, cell).sum(axis=(1, 3))


def test_adam_steps_on_a_tiny_net_lower_the_total_loss():
    torch.manual_seed(4)
    target = torch.zeros(2, 1, 32, 32)
    target[0, 0, 2:14, 3:15] = 1  # a dense block
    target[0, 0, 20:23, 22:24] = 1  # small spots
    target[1, 0, 17:31, 1:12] = 1
    target[1, 0, 5:7, 25:28] = 1
    image = torch.cat([target, 1 - target, torch.zeros_like(target)], 1) * 0.5 + 0.3 * torch.randn(2, 3, 32, 32)
    body = torch.nn.Sequential(
        torch.nn.Conv2d(3, 8, 3, padding=1), torch.nn.ReLU(), torch.nn.Conv2d(8, 8, 3, padding=1), torch.nn.ReLU()
    )
    head = torch.nn.Conv2d(8, 1, 1)
    criterion = ExudateLoss(grid=4)  # the paper's alpha, beta, tau; with memory banks
    # the banks fill up as training goes, and more candidates raise a contrastive loss's floor
    # (log |P|): judge the net before and after with a bank-free copy of the loss
    judge = ExudateLoss(grid=4, density_bank_size=0, edge_bank_size=0)

    def judged() -> float:
        with torch.no_grad():
            feats = body(image)
            return judge(head(feats), feats, target)[0].item()

    opt = torch.optim.Adam([*body.parameters(), *head.parameters()], lr=2e-2)
    before = judged()
    for _ in range(10):
        feats = body(image)
        total, parts = criterion(head(feats), feats, target)
        opt.zero_grad()
        total.backward()
        opt.step()
    assert set(parts) == {"global", "density", "edge"} and all(p.grad_fn is None for p in parts.values())
    assert len(criterion.density_bank) > 0 and len(criterion.edge_bank) > 0
    assert judged() < 0.9 * before
