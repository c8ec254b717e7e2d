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
