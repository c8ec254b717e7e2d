"""The coarse-annotation refinement network (Yu, Dang, Zhou, Chen and Ding, "Coarse Retinal Lesion
Annotations Refinement via Prototypical Learning", OMIA workshop at MICCAI 2022, section 2).

An image patch and its coarse mask (an ellipse drawn by the grader) go through a
U-Net whose last two upsampling blocks are removed, so features come out at 1/4
of the input resolution. The features are fused with the 1/4-scale coarse mask
(1x1 Conv + BN + ReLU). The "prototype" variant then classifies each pixel by
its cosine distance to a lesion prototype (mean feature inside the coarse mask,
optionally superpixel-weighted, section 2.2) and a background prototype (mean
feature outside); the "baseline" variant uses a 1x1 conv classifier instead.

The network returns logits (sigmoid gives P(lesion)) upsampled to the input
size, so losses can use BCE-with-logits. Shared by inference
(``napari_retina.models``) and training (``training.recipes``); it imports only
torch and NumPy at module level, scikit-image lazily for the superpixels.
"""

from __future__ import annotations

from typing import Any

import numpy as np
import torch
import torch.nn.functional as F
from torch import nn

__all__ = [
    "RefinerNet",
    "PlainRefinerForward",
    "RefinerFeatures",
    "FEATURE_STRIDE",
    "masked_average_prototype",
    "cosine_distance",
    "prototype_logits",
    "superpixel_segments",
    "superpixel_weighted_prototype",
    "binarise_mask",
    "EPS",
    "SLIC_COMPACTNESS",
]

# guards the denominators of masked pooling and cosine similarity (empty regions, zero vectors)
EPS = 1e-6
# SLIC runs on per-pixel L2-normalised features, so colour distances lie in [0, sqrt(2)]:
# a small compactness lets feature similarity, not position, decide the superpixels
SLIC_COMPACTNESS = 0.1
VARIANTS = ("prototype", "baseline")
# features are at 1/4 of the input resolution (the last two of the U-Net's up blocks are removed)
FEATURE_STRIDE = 4


# ---- prototype maths (Eqs. 1-6) ------------------------------------------------------------------


def masked_average_prototype(features: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
    """Masked average pooling (Eqs. 1, 2): (B, C, H, W) features, (B, 1, H, W) weights -> (B, C).

    An empty mask gives the zero vector (not NaN) thanks to EPS in the denominator.
    """
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    mask = mask.to(features.dtype)
    return (features * mask).sum(dim=(2, 3)) / (mask.sum(dim=(2, 3)) + EPS)


def _norm(x: torch.Tensor, dim: int) -> torch.Tensor:
    # sqrt(|x|^2 + eps) rather than |x|: smooth, so a zero vector (all-ReLU-off pixel) has a finite gradient
    return torch.sqrt((x * x).sum(dim=dim) + EPS * EPS)


def cosine_distance(features: torch.Tensor, prototype: torch.Tensor) -> torch.Tensor:
    """d = 1 - cos(features, prototype) over dim 1 (Eqs. 3, 4).

    ``features`` is (B, C, *spatial) (e.g. (B, C, H, W), or (B, C, K) for K sub-prototypes),
    ``prototype`` is (B, C); the result is (B, *spatial). A zero vector on either side gives
    d = 1 (no similarity), never NaN.
    """
    b, c = prototype.shape
    p = prototype.reshape(b, c, *([1] * (features.dim() - 2)))
    dot = (features * p).sum(dim=1)
    return 1.0 - dot / (_norm(features, 1) * _norm(p, 1))


def prototype_logits(
    features: torch.Tensor, p_fg: torch.Tensor, p_bg: torch.Tensor, alpha: float
) -> torch.Tensor:
    """Logits whose sigmoid is the 2-class softmax of -alpha * d (Eq. 3): (B, 1, H, W).

    softmax([-a d_fg, -a d_bg])[fg] = 1 / (1 + exp(-a (d_bg - d_fg))) = sigmoid(a (d_bg - d_fg)).
    """
    d_fg = cosine_distance(features, p_fg)
    d_bg = cosine_distance(features, p_bg)
    return (alpha * (d_bg - d_fg)).unsqueeze(1)


def binarise_mask(soft: torch.Tensor) -> torch.Tensor:
    """The 1/4-scale coarse mask for prototype pooling: soft >= 0.5, or soft > 0 where that is empty.

    Per sample, so that a coarse ellipse thinner than 4 pixels still yields a lesion region.
    """
    hard = soft >= 0.5
    empty = ~hard.flatten(1).any(dim=1)
    # branch-free, so that a traced network (inference) keeps the fallback
    hard = torch.where(empty.view(-1, *([1] * (soft.dim() - 1))), soft > 0, hard)
    return hard.to(soft.dtype)


def superpixel_segments(
    features: torch.Tensor | np.ndarray,
    mask: torch.Tensor | np.ndarray,
    n_superpixels: int = 20,
    compactness: float = SLIC_COMPACTNESS,
) -> np.ndarray:
    """maskSLIC superpixels of a feature map inside a mask (section 2.2).

    ``features`` (C, H, W) or (B, C, H, W); ``mask`` (H, W), (1, H, W), (B, H, W) or (B, 1, H, W),
    non-zero inside. Returns int64 labels (H, W) or (B, H, W): 0 outside the mask, 1..K inside,
    K <= n_superpixels (K = 0 for an empty mask). Not differentiable: it runs on detached CPU data.
    """
    feats = features.detach().float().cpu().numpy() if torch.is_tensor(features) else np.asarray(features)
    m = mask.detach().cpu().numpy() if torch.is_tensor(mask) else np.asarray(mask)
    if feats.ndim == 4:
        m = m.reshape(feats.shape[0], *feats.shape[2:])
        return np.stack([superpixel_segments(f, mi, n_superpixels, compactness) for f, mi in zip(feats, m)])
    if feats.ndim != 3:
        raise ValueError(f"features must be (C, H, W) or (B, C, H, W), got shape {feats.shape}")
    m = m.reshape(feats.shape[1:]) > 0
    labels = np.zeros(m.shape, np.int64)
    if not m.any() or n_superpixels < 1:
        return labels

    from skimage.segmentation import slic  # lazily: only the superpixel path needs it

    # unit-length pixels, so SLIC's Euclidean colour distance follows the cosine distance used for prototypes
    hwc = np.moveaxis(feats, 0, -1).astype(np.float64)
    hwc = hwc / np.sqrt((hwc * hwc).sum(-1, keepdims=True) + EPS * EPS)
    kwargs = dict(
        n_segments=n_superpixels, mask=m, channel_axis=-1, compactness=compactness,
        start_label=1, convert2lab=False,
    )
    seg = slic(hwc, enforce_connectivity=True, **kwargs)
    if len(np.unique(seg[m & (seg > 0)])) > n_superpixels:
        # enforcing connectivity splits scattered clusters into more segments than asked for
        seg = slic(hwc, enforce_connectivity=False, **kwargs)
    seg = np.where(m, seg, 0)
    ids = np.unique(seg[seg > 0])
    lut = np.zeros(int(seg.max()) + 1, np.int64)
    lut[ids] = np.arange(1, len(ids) + 1)  # consecutive labels 1..K
    labels = lut[seg]
    unlabelled = m & (labels == 0)
    if unlabelled.any() and len(ids) < n_superpixels:
        # SLIC leaves a one-pixel mask unlabelled; the leftover pixels become one more superpixel
        labels[unlabelled] = len(ids) + 1
    return labels


def superpixel_weighted_prototype(
    features: torch.Tensor,
    mask: torch.Tensor,
    p_bg: torch.Tensor,
    n_superpixels: int = 20,
    beta: float = 10.0,
    segments: np.ndarray | torch.Tensor | None = None,
    return_weights: bool = False,
):
    """Superpixel-guided lesion prototype p_weighted (Eqs. 4-6): (B, C).

    Sub-prototypes g_i are masked averages over each superpixel inside ``mask`` (B, 1, H, W);
    w_i = softmax_i(beta * d(g_i, p_bg)); p_weighted = sum_i w_i g_i. ``segments`` (B, H, W)
    or (H, W) (labels > 0, only those inside the mask count) replaces maskSLIC, e.g. in tests.
    A sample with no superpixel falls back to the plain masked average. Gradients flow through
    the pooling and the weights; the superpixel assignment itself is constant.
    With ``return_weights`` also returns a list of per-sample weight vectors (K_b,).
    """
    b = features.shape[0]
    if mask.dim() == 3:
        mask = mask.unsqueeze(1)
    if segments is None:
        segments = superpixel_segments(features, mask, n_superpixels)
    seg = torch.as_tensor(np.asarray(segments) if not torch.is_tensor(segments) else segments)
    seg = seg.to(features.device, torch.long).reshape(b, *features.shape[2:])
    seg = torch.where(mask[:, 0] > 0, seg, torch.zeros_like(seg))

    out, weights = [], []
    for i in range(b):
        ids = torch.unique(seg[i])
        ids = ids[ids > 0]
        if ids.numel() == 0:
            out.append(masked_average_prototype(features[i : i + 1], mask[i : i + 1])[0])
            weights.append(features.new_zeros(0))
            continue
        onehot = (seg[i].unsqueeze(0) == ids.view(-1, 1, 1)).to(features.dtype)  # (K, H, W)
        g = torch.einsum("chw,khw->kc", features[i], onehot) / (onehot.sum(dim=(1, 2)).unsqueeze(1) + EPS)
        d = cosine_distance(g.t().unsqueeze(0), p_bg[i : i + 1])[0]  # (K,)
        w = torch.softmax(beta * d, dim=0)
        out.append((w.unsqueeze(1) * g).sum(dim=0))
        weights.append(w)
    p = torch.stack(out)
    return (p, weights) if return_weights else p


def smooth_quarter_logits(logits: torch.Tensor) -> torch.Tensor:
    """A 3x3 binomial ([1, 2, 1] / 4 per axis) filter over the 1/4-scale logits.

    The decoder's stride-2 transposed convolution leaves a period-2 pattern on the 1/4-scale
    grid (a grid of dots where the lesion probability hovers near the threshold); this filter's
    response at that frequency is exactly zero, and it keeps a 3-cell footprint.
    """
    k1 = torch.tensor([0.25, 0.5, 0.25], dtype=logits.dtype, device=logits.device)
    k = (k1[:, None] * k1[None, :]).expand(logits.shape[1], 1, 3, 3)
    return F.conv2d(F.pad(logits, (1, 1, 1, 1), mode="replicate"), k, groups=logits.shape[1])


# ---- the network -----------------------------------------------------------------------------------


class _DoubleConv(nn.Sequential):
    """(3x3 conv, BN, ReLU) x 2, the U-Net block."""

    def __init__(self, cin: int, cout: int):
        super().__init__(
            nn.Conv2d(cin, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
        )


class _Up(nn.Module):
    """Transposed-conv upsampling by 2, concatenation with the skip, double conv."""

    def __init__(self, cin: int, cskip: int, cout: int):
        super().__init__()
        self.up = nn.ConvTranspose2d(cin, cin // 2, 2, stride=2)
        self.conv = _DoubleConv(cin // 2 + cskip, cout)

    def forward(self, x: torch.Tensor, skip: torch.Tensor) -> torch.Tensor:
        return self.conv(torch.cat([self.up(x), skip], dim=1))


class _TruncatedUNet(nn.Module):
    """U-Net with ``depth`` resolution levels (depth - 1 poolings) minus its last two up blocks.

    Channels base * 2**level; the output is level 2 of the decoder: stride 4, base * 4 channels.
    """

    def __init__(self, in_channels: int, base: int, depth: int):
        super().__init__()
        ch = [base * 2**i for i in range(depth)]
        self.down = nn.ModuleList([_DoubleConv(in_channels, ch[0])] + [_DoubleConv(ch[i - 1], ch[i]) for i in range(1, depth)])
        # up blocks from the bottleneck down to level 2 only (levels 1 and 0 are the removed ones)
        self.up = nn.ModuleList([_Up(ch[i], ch[i - 1], ch[i - 1]) for i in range(depth - 1, 2, -1)])
        self.out_channels = ch[2]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            if i:
                x = F.max_pool2d(x, 2)
            x = block(x)
            skips.append(x)
        for up, skip in zip(self.up, reversed(skips[2:-1])):
            x = up(x, skip)
        return x


class RefinerNet(nn.Module):
    """Coarse mask -> refined lesion logits (section 2 of the prototype refinement paper).

    ``forward(image, mask, superpixels=None)``: image (B, 3, H, W) normalised, mask (B, 1, H, W)
    in {0, 1}; H and W divisible by 2**(depth - 1). Returns logits (B, 1, H, W); sigmoid gives
    P(lesion). ``superpixels`` overrides the construction-time switch of the superpixel-guided
    prototype weighting (prototype variant only).
    """

    def __init__(
        self,
        base_channels: int = 16,
        depth: int = 4,
        fused_channels: int = 64,
        variant: str = "prototype",
        alpha: float = 20.0,
        superpixels: bool = False,
        n_superpixels: int = 20,
        beta: float = 10.0,
        smooth_logits: bool = False,
    ):
        super().__init__()
        if variant not in VARIANTS:
            raise ValueError(f"variant must be one of {VARIANTS}, got {variant!r}")
        if depth < 3:
            raise ValueError(f"depth must be at least 3 (features at 1/4 resolution), got {depth}")
        if superpixels and variant != "prototype":
            raise ValueError("superpixel weighting needs the prototype variant")
        self.base_channels = int(base_channels)
        self.depth = int(depth)
        self.fused_channels = int(fused_channels)
        self.variant = variant
        self.alpha = float(alpha)
        self.superpixels = bool(superpixels)
        self.n_superpixels = int(n_superpixels)
        self.beta = float(beta)
        self.smooth_logits = bool(smooth_logits)

        self.backbone = _TruncatedUNet(4, self.base_channels, self.depth)
        # the paper's fusion: [features, 1/4-scale coarse mask] -> 1x1 Conv + BN + ReLU
        self.fusion = nn.Sequential(
            nn.Conv2d(self.backbone.out_channels + 1, self.fused_channels, 1, bias=False),
            nn.BatchNorm2d(self.fused_channels),
            nn.ReLU(inplace=True),
        )
        self.classifier = nn.Conv2d(self.fused_channels, 1, 1) if variant == "baseline" else None

    # -- configuration ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The init arguments, JSON-serialisable (for the model folder's config.json)."""
        return {
            "base_channels": self.base_channels,
            "depth": self.depth,
            "fused_channels": self.fused_channels,
            "variant": self.variant,
            "alpha": self.alpha,
            "superpixels": self.superpixels,
            "n_superpixels": self.n_superpixels,
            "beta": self.beta,
            "smooth_logits": self.smooth_logits,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "RefinerNet":
        """Build from ``config()``'s dict; keys that are not init arguments are ignored."""
        keys = ("base_channels", "depth", "fused_channels", "variant", "alpha", "superpixels", "n_superpixels", "beta",
                "smooth_logits")
        return cls(**{k: cfg[k] for k in keys if k in cfg})

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2 ** (self.depth - 1)

    # -- forward ------------------------------------------------------------------------------------

    def features(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """Fused feature map F' (B, C', H/4, W/4) and the soft 1/4-scale coarse mask (B, 1, H/4, W/4)."""
        if image.dim() != 4 or image.shape[1] != 3:
            raise ValueError(f"image must be (B, 3, H, W), got {tuple(image.shape)}")
        if mask.dim() == 3:
            mask = mask.unsqueeze(1)
        if mask.shape[0] != image.shape[0] or mask.shape[1] != 1 or mask.shape[2:] != image.shape[2:]:
            raise ValueError(f"mask must be (B, 1, H, W) matching the image {tuple(image.shape)}, got {tuple(mask.shape)}")
        h, w = image.shape[2:]
        k = self.size_multiple
        if h % k or w % k:
            raise ValueError(f"image height and width must be multiples of {k}, got {h}x{w}")
        mask = mask.to(image.dtype)
        feats = self.backbone(torch.cat([image, mask], dim=1))
        soft = F.avg_pool2d(mask, FEATURE_STRIDE)  # area downsampling keeps thin ellipse rims as fractions
        return self.fusion(torch.cat([feats, soft], dim=1)), soft

    def forward(self, image: torch.Tensor, mask: torch.Tensor, superpixels: bool | None = None) -> torch.Tensor:
        use_sp = self.superpixels if superpixels is None else bool(superpixels)
        if use_sp and self.variant != "prototype":
            raise ValueError("superpixel weighting needs the prototype variant")
        fused, soft = self.features(image, mask)
        return F.interpolate(self.head(fused, soft, use_sp), size=image.shape[2:], mode="bilinear", align_corners=False)

    def head(self, fused: torch.Tensor, soft: torch.Tensor, superpixels: bool = False) -> torch.Tensor:
        """1/4-scale logits (B, 1, H/4, W/4) from ``features()``'s output.

        Kept apart from ``features`` (which is local: a convolution stack) because the head is
        not: its prototypes pool over the whole region. Large ellipses are refined by computing
        features window by window and running the head once over the blended feature map.
        """
        if superpixels and self.variant != "prototype":
            raise ValueError("superpixel weighting needs the prototype variant")
        logits = self.classifier(fused) if self.variant == "baseline" else self._prototype_head(fused, soft, superpixels)
        return smooth_quarter_logits(logits) if self.smooth_logits else logits

    def _prototype_head(self, fused: torch.Tensor, soft: torch.Tensor, use_sp: bool) -> torch.Tensor:
        # in float32 even under AMP: fp16 would flush EPS**2 to zero and give zero vectors NaN gradients
        with torch.autocast(device_type=fused.device.type, enabled=False):
            fused, hard = fused.float(), binarise_mask(soft.float())
            p_fg = masked_average_prototype(fused, hard)
            p_bg = masked_average_prototype(fused, 1.0 - hard)
            if use_sp:
                p_fg = superpixel_weighted_prototype(fused, hard, p_bg, self.n_superpixels, self.beta)
            return prototype_logits(fused, p_fg, p_bg, self.alpha)

    @torch.no_grad()
    def predict_proba(self, image: torch.Tensor, mask: torch.Tensor, superpixels: bool | None = None) -> torch.Tensor:
        """sigmoid(forward(...)): P(lesion) per pixel, (B, 1, H, W), without gradients."""
        return torch.sigmoid(self(image, mask, superpixels=superpixels))


class PlainRefinerForward(nn.Module):
    """``forward(image, mask)`` of a RefinerNet without the superpixel switch: what torch.jit.trace records."""

    def __init__(self, net: RefinerNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> torch.Tensor:
        return self.net(image, mask, superpixels=False)


class RefinerFeatures(nn.Module):
    """``features(image, mask)`` of a RefinerNet as a module: what the windowed path traces."""

    def __init__(self, net: RefinerNet):
        super().__init__()
        self.net = net

    def forward(self, image: torch.Tensor, mask: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        return self.net.features(image, mask)
