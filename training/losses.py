"""Losses for napari-retina's segmenters: (weighted) BCE, soft Dice and their sum.

Every loss takes raw logits (the networks end without a sigmoid, so BCE can use
the numerically stable log-sum-exp form) and a binary target of the same shape
(N, ...), and returns a scalar tensor. An optional `mask` of the same shape
(1 = counts, 0 = ignored) restricts a loss to some pixels, e.g. the fundus field
of view or the inside of a grader's ellipse. Losses are computed in float32 so
they stay accurate under float16/bfloat16 autocast.

Later work adds the patch-wise density and edge contrastive losses and the
triplet loss here; each is one function of (outputs, targets, ...) -> scalar.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F

__all__ = ["weighted_bce", "dice_loss", "bce_dice_loss"]


def _as_float(logits: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None):
    if logits.shape != target.shape:
        raise ValueError(f"logits {tuple(logits.shape)} and target {tuple(target.shape)} differ in shape")
    if mask is not None and mask.shape != logits.shape:
        raise ValueError(f"mask {tuple(mask.shape)} and logits {tuple(logits.shape)} differ in shape")
    return logits.float(), target.float(), (None if mask is None else mask.float())


def weighted_bce(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
) -> torch.Tensor:
    """Mean binary cross-entropy with logits; lesion pixels weigh `pos_weight` times more.

    Lesions cover a tiny fraction of a fundus image, so a `pos_weight` > 1 keeps
    the network from predicting background everywhere. With a `mask`, the mean
    is over the masked pixels only (0 when the mask is empty).
    """
    logits, target, mask = _as_float(logits, target, mask)
    if pos_weight is not None:
        pos_weight = torch.as_tensor(pos_weight, dtype=logits.dtype, device=logits.device)
    per_pixel = F.binary_cross_entropy_with_logits(logits, target, pos_weight=pos_weight, reduction="none")
    if mask is None:
        return per_pixel.mean()
    return (per_pixel * mask).sum() / mask.sum().clamp_min(1.0)


def dice_loss(
    logits: torch.Tensor, target: torch.Tensor, eps: float = 1.0, mask: torch.Tensor | None = None
) -> torch.Tensor:
    """1 - soft Dice of sigmoid(logits) and target, per sample, then averaged over the batch.

    Dice = (2 sum(p t) + eps) / (sum(p) + sum(t) + eps) over all non-batch dims;
    `eps` makes a sample with an empty target and an empty prediction score 1
    (no lesion, none predicted) instead of 0/0.
    """
    logits, target, mask = _as_float(logits, target, mask)
    prob = torch.sigmoid(logits)
    if mask is not None:
        prob, target = prob * mask, target * mask
    dims = tuple(range(1, logits.ndim))
    inter = (prob * target).sum(dims)
    total = prob.sum(dims) + target.sum(dims)
    dice = (2.0 * inter + eps) / (total + eps)
    return 1.0 - dice.mean()


def bce_dice_loss(
    logits: torch.Tensor,
    target: torch.Tensor,
    pos_weight: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    dice_weight: float = 1.0,
) -> torch.Tensor:
    """BCE (optionally positive-weighted) + `dice_weight` x Dice loss.

    BCE gives well-behaved per-pixel gradients; Dice counters the class
    imbalance at the level of the whole lesion area.
    """
    return weighted_bce(logits, target, pos_weight, mask=mask) + dice_weight * dice_loss(logits, target, mask=mask)
