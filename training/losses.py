"""Losses for napari-retina's segmenters: (weighted) BCE, soft Dice, their sum, and the
global + patch-wise contrastive loss of the hard-exudate segmenter.

Every pixel loss takes raw logits (the networks end without a sigmoid, so BCE can use
the numerically stable log-sum-exp form) and a binary target of the same shape
(N, ...), and returns a scalar tensor. An optional `mask` of the same shape
(1 = counts, 0 = ignored) restricts a loss to some pixels, e.g. the fundus field
of view or the inside of a grader's ellipse. Losses are computed in float32 so
they stay accurate under float16/bfloat16 autocast.

The exudate loss (Tang, Wang, Cui and Chan, "A Global and Patch-wise Contrastive Loss for Accurate
Automated Exudate Detection", arXiv:2302.11517, 2023, section 3) is

    L_total = L_sup + alpha * L_pd + beta * L_pe                       (Eq. 1)

- `L_sup`: BCE or weighted BCE of the logits (`weighted_bce`).
- `L_pd`, `patch_density_loss`: each input is cut into a grid x grid grid of patches
  (16 x 16 in the paper: 16-px cells of a 256-px input; another input size keeps the 16 x 16
  grid, so cells are H/16 x W/16 px); a patch is lesion-dense when more than half its
  pixels are lesion, else lesion-sparse. One vector per patch, the masked average of the
  penultimate-layer features over its lesion pixels (Eq. 2), and a supervised contrastive
  loss pulls vectors of the same density class together and pushes the classes apart
  (Eqs. 3-4).
- `L_pe`, `edge_aware_loss`: inner contour (mask minus its erosion) and outer contour
  (dilation minus mask) of the target, with 2/2 dilation/erosion iterations in dense
  patches and 5/1 in sparse ones (`patch_contour_masks`); the features pooled over the
  inner contour (edge) are contrasted with those pooled over the outer one (background)
  (Eq. 5).
- `supervised_contrastive` is the shared term (Eq. 4, cosine similarity, temperature
  tau = 0.05), `FeatureMemoryBank` keeps detached vectors of earlier mini-batches as extra
  positives and negatives, and `contrastive_segmentation_loss` / `ExudateLoss` sum the
  three terms and return the parts for logging.

The contrastive losses are pure torch (the morphology is max pooling), so they run on the
training device.

The microaneurysm refinement network (PRN) is trained with `triplet_cosine_loss` (Eq. 1 of
Sarhan et al., "Multi-scale Microaneurysms Segmentation Using Embedding Triplet Loss", MICCAI
2019: anchor and positive are
microaneurysm patches, the negative a healthy one; cosine distance, margin 0.5) plus the
cross-entropy of its logits; the hypothesis networks with `bce_dice_loss` (weighted
cross-entropy plus soft Dice).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "weighted_bce",
    "dice_loss",
    "bce_dice_loss",
    "supervised_contrastive",
    "FeatureMemoryBank",
    "patch_density_labels",
    "patch_contour_masks",
    "patch_density_loss",
    "edge_aware_loss",
    "contrastive_segmentation_loss",
    "ExudateLoss",
]


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


# --------------------------------------------------------------------------------------
# Global and patch-wise contrastive loss (hard exudates)
# --------------------------------------------------------------------------------------

_LESION_FREE_RULES = ("patch", "skip")
_EDGE_POOLINGS = ("image", "patch")


def supervised_contrastive(
    anchors: torch.Tensor,
    anchor_labels: torch.Tensor,
    others: torch.Tensor | None = None,
    other_labels: torch.Tensor | None = None,
    tau: float = 0.05,
) -> torch.Tensor:
    """Supervised contrastive loss (Eq. 4), averaged over the anchors (Eq. 3).

    anchors (A, C) with integer `anchor_labels` (A,); `others` (M, C) with `other_labels`
    (M,) are extra candidates that are never anchors (e.g. memory-bank entries). For anchor
    i the candidates are every other anchor and every `others` row; positives P(i) are the
    candidates with i's label, negatives the rest, and

        L_i = -1/|P(i)| sum_{q in P(i)} log( exp(s_iq / tau) / sum_{k in P(i) u N(i)} exp(s_ik / tau) )

    with s the cosine similarity. Anchors without a positive are skipped; when none is
    left the result is an exact 0 that still depends on `anchors` (backward works). Computed
    in float32 with autocast off (cosines / 0.05 reach +-20, too coarse in half precision),
    with log-sum-exp for stability.
    """
    if anchors.ndim != 2:
        raise ValueError(f"anchors must be (A, C), got {tuple(anchors.shape)}")
    if others is not None and (other_labels is None or others.ndim != 2 or others.shape[1] != anchors.shape[1]):
        raise ValueError("others must be (M, C) like the anchors, with other_labels (M,)")
    with torch.autocast(device_type=anchors.device.type, enabled=False):
        a = F.normalize(anchors.float(), dim=1, eps=1e-8)
        la = anchor_labels.reshape(-1).to(device=a.device, dtype=torch.long)
        cand, lc = a, la
        if others is not None and len(others):
            o = F.normalize(others.to(a.device).float(), dim=1, eps=1e-8)
            cand = torch.cat([a, o])
            lc = torch.cat([la, other_labels.reshape(-1).to(device=a.device, dtype=torch.long)])
        n_anchor = a.shape[0]
        sim = a @ cand.T / tau  # (A, A + M)
        is_self = torch.zeros(sim.shape, dtype=torch.bool, device=a.device)
        is_self[:, :n_anchor] = torch.eye(n_anchor, dtype=torch.bool, device=a.device)
        positive = (la[:, None] == lc[None, :]) & ~is_self
        n_pos = positive.sum(1)
        keep = n_pos > 0
        if not bool(keep.any()):
            return anchors.float().sum() * 0.0  # nothing to contrast: 0, still in the graph
        sim, is_self, positive, n_pos = sim[keep], is_self[keep], positive[keep], n_pos[keep]
        log_denominator = torch.logsumexp(sim.masked_fill(is_self, float("-inf")), dim=1)
        mean_positive = torch.where(positive, sim, torch.zeros_like(sim)).sum(1) / n_pos
        return (log_denominator - mean_positive).mean()


class FeatureMemoryBank:
    """The most recent detached feature vectors of each class, FIFO, `capacity` per class.

    The contrastive losses read it for extra positives and negatives from earlier
    mini-batches (the paper's memory bank), then push the current batch's vectors. A
    capacity per class keeps the rare class (lesion-dense patches) from being flushed out by
    the common one. Entries are detached float32 copies: gradients flow only through the
    current batch's anchors. Labels are integers 0 .. num_classes - 1.
    """

    def __init__(self, capacity: int = 1024, num_classes: int = 2):
        if capacity < 1 or num_classes < 1:
            raise ValueError("capacity and num_classes must be positive")
        self.capacity = int(capacity)
        self.num_classes = int(num_classes)
        self._queues: list[torch.Tensor | None] = [None] * self.num_classes

    def push(self, features: torch.Tensor, labels: torch.Tensor) -> None:
        """Append rows of `features` (B, C) by class, dropping the oldest beyond capacity."""
        f = features.detach().float()
        labels = labels.reshape(-1).to(f.device)
        for c in range(self.num_classes):
            new = f[labels == c]  # boolean indexing copies: no storage shared with the graph
            if not len(new):
                continue
            old = self._queues[c]
            queue = new if old is None else torch.cat([old.to(new.device), new])
            self._queues[c] = queue[-self.capacity :]

    def get(self, device: torch.device | str | None = None) -> tuple[torch.Tensor | None, torch.Tensor | None]:
        """(features (M, C), labels (M,)), class by class, oldest first; (None, None) when empty."""
        feats, labels = [], []
        for c, q in enumerate(self._queues):
            if q is not None:
                q = q if device is None else q.to(device)
                feats.append(q)
                labels.append(torch.full((len(q),), c, dtype=torch.long, device=q.device))
        if not feats:
            return None, None
        return torch.cat(feats), torch.cat(labels)

    def __len__(self) -> int:
        return sum(0 if q is None else len(q) for q in self._queues)

    def clear(self) -> None:
        self._queues = [None] * self.num_classes


def _cell_size(height: int, width: int, grid: int) -> tuple[int, int]:
    if grid < 1 or height % grid or width % grid:
        raise ValueError(
            f"a {height}x{width} input does not split into a {grid}x{grid} grid of patches: "
            f"H and W must be multiples of grid={grid}"
        )
    return height // grid, width // grid


def _check_target(target: torch.Tensor, features: torch.Tensor | None = None) -> None:
    if target.ndim != 4 or target.shape[1] != 1:
        raise ValueError(f"target must be (N, 1, H, W), got {tuple(target.shape)}")
    if features is not None and (
        features.ndim != 4 or features.shape[0] != target.shape[0] or features.shape[2:] != target.shape[2:]
    ):
        raise ValueError(
            f"features {tuple(features.shape)} must be (N, C, H, W) with the target's N, H, W {tuple(target.shape)}"
        )


def _cell_sums(x: torch.Tensor, grid: int) -> torch.Tensor:
    """Sum of (N, C, H, W) over each cell of a grid x grid grid: (N, C, grid, grid)."""
    n, c, h, w = x.shape
    ch, cw = _cell_size(h, w, grid)
    return x.reshape(n, c, grid, ch, grid, cw).sum(dim=(3, 5))


def _per_pixel(cells: torch.Tensor, height: int, width: int) -> torch.Tensor:
    """(N, C, grid, grid) -> (N, C, H, W): each pixel takes its cell's value."""
    ch, cw = height // cells.shape[-2], width // cells.shape[-1]
    return cells.repeat_interleave(ch, dim=-2).repeat_interleave(cw, dim=-1)


def _masked_means(features: torch.Tensor, weights: torch.Tensor, grid: int) -> tuple[torch.Tensor, torch.Tensor]:
    """Masked average pooling (Eq. 2) per cell: vectors (N * grid * grid, C) and pixel counts."""
    sums = _cell_sums(features.float() * weights, grid)
    counts = _cell_sums(weights, grid)
    means = sums / counts.clamp_min(1.0)
    return means.permute(0, 2, 3, 1).reshape(-1, features.shape[1]), counts.reshape(-1)


def patch_density_labels(target: torch.Tensor, grid: int = 16) -> torch.Tensor:
    """Lesion-dense patches: (N, grid, grid) bool, True where more than half the patch is lesion.

    target (N, 1, H, W) binary; H and W must be multiples of `grid` (cells of H/grid x
    W/grid px; the paper's 16 x 16 grid on a 256-px input gives 16-px cells). Exactly half
    is sparse (paper: sparse <= 0.5). Compared as integer counts, so no rounding decides it.
    """
    _check_target(target)
    ch, cw = _cell_size(target.shape[2], target.shape[3], grid)
    counts = _cell_sums((target > 0.5).float(), grid)[:, 0]
    return 2 * counts > ch * cw


def _dilate(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    # max_pool2d pads with -inf: pixels beyond the image never switch a pixel on
    for _ in range(iterations):
        mask = F.max_pool2d(mask, 3, stride=1, padding=1)
    return mask


def _erode(mask: torch.Tensor, iterations: int) -> torch.Tensor:
    # padding is ignored here too, i.e. the image border is not a lesion edge: a network
    # input is a crop, and a lesion cut by the crop goes on outside it
    for _ in range(iterations):
        mask = 1.0 - F.max_pool2d(1.0 - mask, 3, stride=1, padding=1)
    return mask


def patch_contour_masks(
    target: torch.Tensor,
    grid: int = 16,
    dense_iterations: tuple[int, int] = (2, 2),
    sparse_iterations: tuple[int, int] = (5, 1),
) -> tuple[torch.Tensor, torch.Tensor]:
    """Inner and outer contour masks of a binary target, (N, 1, H, W) float each.

    inner = mask minus its erosion, outer = dilation minus mask; each iteration is one
    dilation or erosion with a 3x3 square structuring element (max pooling, i.e. scipy's
    binary_dilation/erosion with `structure=np.ones((3, 3))`). Iterations (dilation,
    erosion) are `dense_iterations` = (2, 2) in lesion-dense patches and
    `sparse_iterations` = (5, 1) in lesion-sparse ones (a wider background ring around
    scattered small spots), per `patch_density_labels(target, grid)`.

    Patch borders: the morphology runs on the whole mask, and each patch keeps its own
    rule's result inside its cell. Patches are a bookkeeping grid, not anatomy: cutting the
    mask at cell borders would mark every lesion crossing a border as an edge there and
    stop a dilation at the border. The image border is not an edge either (pixels outside
    count as unknown; scipy's `border_value=1` for the erosion).
    """
    _check_target(target)
    with torch.no_grad():
        mask = (target > 0.5).float()
        dense = _per_pixel(patch_density_labels(target, grid)[:, None].float(), *mask.shape[2:]) > 0.5
        dilated, eroded = {}, {}
        d = mask
        for i in range(1, max(dense_iterations[0], sparse_iterations[0]) + 1):
            d = _dilate(d, 1)
            dilated[i] = d
        e = mask
        for i in range(1, max(dense_iterations[1], sparse_iterations[1]) + 1):
            e = _erode(e, 1)
            eroded[i] = e
        dilated[0], eroded[0] = mask, mask
        inner = mask - torch.where(dense, eroded[dense_iterations[1]], eroded[sparse_iterations[1]])
        outer = torch.where(dense, dilated[dense_iterations[0]], dilated[sparse_iterations[0]]) - mask
    return inner, outer


def _sample_per_class(labels: torch.Tensor, max_samples: int | None, generator: torch.Generator | None):
    """Indices of at most `max_samples` rows of each label, drawn at random when there are more."""
    chosen = []
    for c in labels.unique(sorted=True):
        idx = torch.nonzero(labels == c).reshape(-1)
        if max_samples is not None and len(idx) > max_samples:
            pick = torch.randperm(len(idx), generator=generator)[:max_samples]
            idx = idx[pick.to(idx.device)]
        chosen.append(idx)
    if not chosen:
        return torch.zeros(0, dtype=torch.long, device=labels.device)
    return torch.cat(chosen)


def _contrast(
    vectors: torch.Tensor,
    labels: torch.Tensor,
    valid: torch.Tensor,
    tau: float,
    max_samples: int | None,
    bank: FeatureMemoryBank | None,
    generator: torch.Generator | None,
) -> torch.Tensor:
    """Sample anchors among the valid vectors, contrast them with each other and the bank, then fill the bank."""
    vectors, labels = vectors[valid], labels[valid]
    idx = _sample_per_class(labels, max_samples, generator)
    anchors, anchor_labels = vectors[idx], labels[idx]
    others, other_labels = bank.get(anchors.device) if bank is not None else (None, None)
    loss = supervised_contrastive(anchors, anchor_labels, others, other_labels, tau=tau)
    if bank is not None:
        bank.push(anchors, anchor_labels)  # after the loss: a vector is never its own positive
    return loss


def patch_density_loss(
    features: torch.Tensor,
    target: torch.Tensor,
    grid: int = 16,
    tau: float = 0.05,
    max_samples: int | None = 256,
    bank: FeatureMemoryBank | None = None,
    lesion_free: str = "patch",
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Patch-wise density loss L_pd (Eqs. 2-4): contrast lesion-dense with lesion-sparse patches.

    features (N, C, H, W): the penultimate-layer map at the input resolution (the last
    feature map before the 1x1 classifier); target (N, 1, H, W) binary. The input is cut
    into a `grid` x `grid` grid (the paper: 16 x 16, i.e. 16-px cells at 256 px; other sizes
    keep 16 x 16 cells of H/16 x W/16 px); H and W must be multiples of `grid`. Each patch
    gives the average of the features over its lesion pixels (Eq. 2), labelled dense
    (lesion proportion > 0.5) or sparse; at most `max_samples` vectors per class are drawn
    at random as anchors; `bank` adds earlier batches' vectors as extra positives/negatives
    and then receives these anchors (detached).

    Eq. 2 is 0/0 for a patch without lesion pixels (most of a fundus image). `lesion_free`:
    - "patch" (default): such a patch is pooled over all its pixels, i.e. over background.
      The paper counts proportion 0 among the sparse patches (<= 0.5), and without these
      vectors most batches would hold a handful of patches, often of one class only; with
      them the dense-lesion features are pushed away from background features, the contrast
      a segmenter needs. (An epsilon in the denominator would give a zero vector, which has
      no direction for a cosine similarity.)
    - "skip": leave them out (Eq. 2 to the letter: only lesion pixels are pooled).
    An all-background or all-lesion batch gives a finite loss (possibly an exact 0 in the graph).
    """
    _check_target(target, features)
    if lesion_free not in _LESION_FREE_RULES:
        raise ValueError(f"lesion_free must be one of {_LESION_FREE_RULES}, got {lesion_free!r}")
    h, w = target.shape[2:]
    mask = (target > 0.5).float()
    dense = patch_density_labels(target, grid)  # (N, g, g)
    weights = mask
    if lesion_free == "patch":
        lesion_free_cells = _cell_sums(mask, grid) == 0  # (N, 1, g, g)
        weights = torch.where(_per_pixel(lesion_free_cells.float(), h, w) > 0.5, torch.ones_like(mask), mask)
    vectors, counts = _masked_means(features, weights, grid)
    labels = dense.reshape(-1).long()  # row order of _masked_means: image, cell row, cell column
    return _contrast(vectors, labels, counts > 0, tau, max_samples, bank, generator)


def edge_aware_loss(
    features: torch.Tensor,
    target: torch.Tensor,
    grid: int = 16,
    tau: float = 0.05,
    max_samples: int | None = 256,
    bank: FeatureMemoryBank | None = None,
    pooling: str = "image",
    dense_iterations: tuple[int, int] = (2, 2),
    sparse_iterations: tuple[int, int] = (5, 1),
    generator: torch.Generator | None = None,
) -> torch.Tensor:
    """Patch-wise edge-aware loss L_pe (Eq. 5): contrast lesion-edge with surrounding-background features.

    Inner and outer contour masks come from `patch_contour_masks` (per-patch iterations on
    the `grid` x `grid` grid; see there for patch and image borders). Edge features f_e are
    the masked average of `features` over the inner contour, background features f_b over
    the outer contour; an edge anchor's positives are the other edge features and its
    negatives the background ones, and vice versa.

    `pooling="image"` (default) gives one f_e and one f_b per image, as Eq. 5 normalises by
    2|B| (B the images of the batch) - the loss is the mean over these 2|B| anchors;
    `pooling="patch"` gives one pair per patch (more, noisier vectors). A vector whose
    contour is empty (an image without lesion, or one all lesion) is left out; `bank` adds
    earlier batches' vectors, so that a batch of one image still has positives. At most
    `max_samples` vectors per class are drawn at random as anchors. Finite always; an exact
    0 in the graph when nothing can be contrasted.
    """
    _check_target(target, features)
    if pooling not in _EDGE_POOLINGS:
        raise ValueError(f"pooling must be one of {_EDGE_POOLINGS}, got {pooling!r}")
    inner, outer = patch_contour_masks(target, grid, dense_iterations, sparse_iterations)
    pool_grid = 1 if pooling == "image" else grid
    edge, n_edge = _masked_means(features, inner, pool_grid)
    background, n_background = _masked_means(features, outer, pool_grid)
    vectors = torch.cat([edge, background])
    labels = torch.cat([torch.ones_like(n_edge), torch.zeros_like(n_background)]).long()  # 1 edge, 0 background
    return _contrast(vectors, labels, torch.cat([n_edge, n_background]) > 0, tau, max_samples, bank, generator)


def contrastive_segmentation_loss(
    logits: torch.Tensor,
    features: torch.Tensor,
    target: torch.Tensor,
    alpha: float = 0.02,
    beta: float = 0.1,
    global_loss: str = "bce",
    pos_weight: float | torch.Tensor | None = None,
    mask: torch.Tensor | None = None,
    grid: int = 16,
    tau: float = 0.05,
    max_samples: int | None = 256,
    density_bank: FeatureMemoryBank | None = None,
    edge_bank: FeatureMemoryBank | None = None,
    lesion_free: str = "patch",
    edge_pooling: str = "image",
    generator: torch.Generator | None = None,
) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    """L_total = L_sup + alpha L_pd + beta L_pe (Eq. 1); returns (total, {"global", "density", "edge"}).

    logits and target (N, 1, H, W); features (N, C, H, W) the penultimate-layer map. The
    paper's alpha = 0.02, beta = 0.1, tau = 0.05 and 16 x 16 patches are the defaults.
    `global_loss`: "bce" (plain, as in the paper; `pos_weight` must be None) or "wbce"
    (lesion pixels weigh `pos_weight`; None = background/lesion pixel ratio of the batch,
    at least 1). `mask` (field of view) restricts the global term only. A term whose weight
    is 0 is not computed (and leaves its bank alone). The parts are detached, for logging.
    """
    if global_loss not in ("bce", "wbce"):
        raise ValueError(f"global_loss must be 'bce' or 'wbce', got {global_loss!r}")
    if global_loss == "bce" and pos_weight is not None:
        raise ValueError("pos_weight is for global_loss='wbce'; plain BCE has none")
    if global_loss == "wbce" and pos_weight is None:
        t = (target > 0.5).float() if mask is None else (target > 0.5).float() * mask
        n = target.numel() if mask is None else mask.float().sum()
        pos_weight = ((n - t.sum()) / t.sum().clamp_min(1.0)).clamp_min(1.0).detach()
    sup = weighted_bce(logits, target, pos_weight, mask=mask)
    zero = sup.new_zeros(())
    density = (
        patch_density_loss(features, target, grid, tau, max_samples, density_bank, lesion_free, generator)
        if alpha
        else zero
    )
    edge = (
        edge_aware_loss(features, target, grid, tau, max_samples, edge_bank, edge_pooling, generator=generator)
        if beta
        else zero
    )
    total = sup + alpha * density + beta * edge
    return total, {"global": sup.detach(), "density": density.detach(), "edge": edge.detach()}


class ExudateLoss(nn.Module):
    """`contrastive_segmentation_loss` with its settings and its two memory banks.

    loss = ExudateLoss(); total, parts = loss(logits, features, target). The banks (one for
    density vectors, one for edge/background vectors: different feature spaces) live across
    calls and are not saved in the state dict: after a resume they refill within a few
    batches. Each DDP process keeps its own. A bank size of 0 turns that bank off.
    """

    def __init__(
        self,
        alpha: float = 0.02,
        beta: float = 0.1,
        global_loss: str = "bce",
        pos_weight: float | None = None,
        grid: int = 16,
        tau: float = 0.05,
        max_samples: int | None = 256,
        density_bank_size: int = 1024,
        edge_bank_size: int = 64,
        lesion_free: str = "patch",
        edge_pooling: str = "image",
    ):
        super().__init__()
        if lesion_free not in _LESION_FREE_RULES or edge_pooling not in _EDGE_POOLINGS:
            raise ValueError(f"lesion_free in {_LESION_FREE_RULES}, edge_pooling in {_EDGE_POOLINGS}")
        self.settings = dict(
            alpha=alpha, beta=beta, global_loss=global_loss, pos_weight=pos_weight, grid=grid, tau=tau,
            max_samples=max_samples, lesion_free=lesion_free, edge_pooling=edge_pooling,
        )  # fmt: skip
        # density bank ~ four batches of sampled patches; edge bank ~ eight batches of 8 images
        self.density_bank = FeatureMemoryBank(density_bank_size) if density_bank_size else None
        self.edge_bank = FeatureMemoryBank(edge_bank_size) if edge_bank_size else None

    def forward(
        self, logits: torch.Tensor, features: torch.Tensor, target: torch.Tensor, mask: torch.Tensor | None = None
    ) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
        return contrastive_segmentation_loss(
            logits, features, target, mask=mask, density_bank=self.density_bank, edge_bank=self.edge_bank,
            **self.settings,
        )  # fmt: skip


def cosine_distance(a: torch.Tensor, b: torch.Tensor, eps: float = 1e-8) -> torch.Tensor:
    """1 - cos(a, b) row by row: 0 for the same direction, 1 for orthogonal, 2 for opposite."""
    a, b = a.float(), b.float()
    return 1.0 - F.cosine_similarity(a, b, dim=1, eps=eps)


def triplet_cosine_loss(anchor: torch.Tensor, positive: torch.Tensor, negative: torch.Tensor,
                        margin: float = 0.5, reduction: str = "mean") -> torch.Tensor:
    """[d(a, p) - d(a, n) + margin]_+ with d the cosine distance (the PRN's Eq. 1), per triplet.

    `anchor`, `positive`, `negative`: (N, D) embeddings. The paper sums over its triplets; the
    mean (default) only rescales that by 1/N, which keeps the loss independent of the batch
    size; `reduction="none"` gives each triplet's loss (selective sampling ranks negatives by it).
    """
    if not anchor.shape == positive.shape == negative.shape or anchor.ndim != 2:
        raise ValueError(f"anchor, positive and negative must all be (N, D), got {tuple(anchor.shape)}, "
                         f"{tuple(positive.shape)}, {tuple(negative.shape)}")
    per = torch.clamp(cosine_distance(anchor, positive) - cosine_distance(anchor, negative) + margin, min=0.0)
    if reduction == "none":
        return per
    if reduction == "sum":
        return per.sum()
    return per.mean()
