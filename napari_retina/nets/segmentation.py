"""Full-image lesion segmenters: the four backbones of the hard-exudate segmenter.

The patch-wise contrastive loss paper (hard exudates on IDRiD, section 4.2) trains four
backbones with the same losses; all four are written here in torch.nn, from scratch (no
pretrained weights can be downloaded here), selectable by name:

- ``"unet"``: U-Net (Ronneberger et al. 2015). Double (3x3 conv, BN, ReLU) blocks,
  max-pool down, bilinear up + concatenated skip + double conv.
- ``"unetpp"``: UNet++ (Zhou et al. 2018). Nested dense skip pathways: node X[i, j]
  convolves the concatenation of X[i, 0..j-1] and the upsampled X[i+1, j-1]. Deep
  supervision is left out: the output is X[0, depth] only.
- ``"resunet"``: ResUnet (Zhang et al. 2018). Pre-activation residual units (BN, ReLU,
  conv) x 2 with a 1x1 projection shortcut in encoder and decoder; stride-2 convolutions
  downsample.
- ``"cenet"``: CE-Net (Gu et al. 2019). A ResNet-34-style encoder (7x7 stride-2 stem,
  max pool, basic blocks 3-4-6-3), a dense atrous convolution (DAC) block and a residual
  multi-kernel pooling (RMP) block at the bottleneck, and decoder blocks (1x1 reduce,
  x2 up, 1x1 expand) whose outputs are added to the encoder skips.

Every backbone upsamples bilinearly and then convolves, never with a transposed
convolution (whose stride-2 kernels leave checkerboard artefacts; CE-Net's transposed
convolutions are replaced that way too). Each ends in a full-resolution feature map of
``feature_channels`` channels, the penultimate layer, followed by one 1x1 classifier.

``forward(x)`` returns logits (N, 1, H, W) (sigmoid gives P(lesion)) at the input size;
``forward_with_features(x)`` also returns that feature map (N, feature_channels, H, W), which
the patch-wise contrastive losses pool under lesion masks.

Input size: H and W must be multiples of ``size_multiple`` = 2**depth (``depth`` is the
number of downsamplings), so that every skip connection lines up with its upsampled
partner; any other size raises ValueError naming the next valid size (pad the image, e.g.
by reflection, and crop the logits). CE-Net's RMP pools with kernels 2, 3, 5 and 6 at the
bottleneck; where the bottleneck map is smaller than a kernel, that kernel shrinks to the
map (the map is pooled whole) rather than failing on small patches.

Shared by inference (``napari_retina.models``) and training (``training.recipes``); it
imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
import torch.nn.functional as F
from torch import nn

__all__ = ["SegmentationNet", "BACKBONES", "DEFAULT_BASE_CHANNELS", "DEFAULT_DEPTH"]

BACKBONES = ("unet", "unetpp", "resunet", "cenet")
# 16 keeps the full-resolution stages thin (CPU inference on whole fundus images) and every
# backbone under ~3.5 M parameters (14 MiB of float32 weights; the model folder allows 15 MiB)
DEFAULT_BASE_CHANNELS = 16
DEFAULT_DEPTH = 4
# ResNet-34's basic blocks per stage (CE-Net's encoder); deeper stages get 2 blocks
_RESNET34_BLOCKS = (3, 4, 6, 3)
_RMP_KERNELS = (2, 3, 5, 6)


def _up_to(x: torch.Tensor, like: torch.Tensor) -> torch.Tensor:
    """Bilinear upsampling of ``x`` to the spatial size of ``like``."""
    return F.interpolate(x, size=like.shape[-2:], mode="bilinear", align_corners=False)


def _conv_bn_relu(cin: int, cout: int, kernel: int = 3, stride: int = 1) -> nn.Sequential:
    return nn.Sequential(
        nn.Conv2d(cin, cout, kernel, stride=stride, padding=kernel // 2, bias=False),
        nn.BatchNorm2d(cout),
        nn.ReLU(inplace=True),
    )


class _DoubleConv(nn.Sequential):
    """(3x3 conv, BN, ReLU) x 2: the U-Net and UNet++ node."""

    def __init__(self, cin: int, cout: int):
        super().__init__(_conv_bn_relu(cin, cout), _conv_bn_relu(cout, cout))


# ---- U-Net -------------------------------------------------------------------------------------------


class _UNet(nn.Module):
    """Channels base * 2**level for levels 0..depth; output: decoder level 0 (base channels)."""

    def __init__(self, in_channels: int, base: int, depth: int):
        super().__init__()
        ch = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList([_DoubleConv(in_channels, ch[0])] + [_DoubleConv(ch[i - 1], ch[i]) for i in range(1, depth + 1)])
        # up[i] brings level i + 1 to level i
        self.up = nn.ModuleList([_DoubleConv(ch[i + 1] + ch[i], ch[i]) for i in range(depth)])
        self.out_channels = ch[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for i, block in enumerate(self.down):
            x = block(F.max_pool2d(x, 2) if i else x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            skip = skips[i]
            x = self.up[i](torch.cat([_up_to(x, skip), skip], dim=1))
        return x


# ---- UNet++ ------------------------------------------------------------------------------------------


class _UNetPlusPlus(nn.Module):
    """Nodes X[i, j], i + j <= depth, channels base * 2**i; output X[0, depth]."""

    def __init__(self, in_channels: int, base: int, depth: int):
        super().__init__()
        ch = [base * 2**i for i in range(depth + 1)]
        self.depth = depth
        # keys "i_j" (ModuleDict keys must be strings)
        nodes = {"0_0": _DoubleConv(in_channels, ch[0])}
        for i in range(1, depth + 1):
            nodes[f"{i}_0"] = _DoubleConv(ch[i - 1], ch[i])
        for j in range(1, depth + 1):
            for i in range(depth - j + 1):
                nodes[f"{i}_{j}"] = _DoubleConv(j * ch[i] + ch[i + 1], ch[i])
        self.nodes = nn.ModuleDict(nodes)
        self.out_channels = ch[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        # X[i] holds the nodes X[i, 0..] of level i computed so far
        X: list[list[torch.Tensor]] = [[] for _ in range(self.depth + 1)]
        X[0].append(self.nodes["0_0"](x))
        for i in range(1, self.depth + 1):
            X[i].append(self.nodes[f"{i}_0"](F.max_pool2d(X[i - 1][0], 2)))
        for j in range(1, self.depth + 1):
            for i in range(self.depth - j + 1):
                inputs = X[i][:j] + [_up_to(X[i + 1][j - 1], X[i][0])]
                X[i].append(self.nodes[f"{i}_{j}"](torch.cat(inputs, dim=1)))
        return X[0][self.depth]


# ---- ResUnet -----------------------------------------------------------------------------------------


class _PreActResidualUnit(nn.Module):
    """(BN, ReLU, 3x3 conv) x 2 plus a (1x1 conv, BN) shortcut: ResUnet's unit.

    ``first``: the unit right after the input starts with a plain conv (no BN/ReLU on raw pixels).
    """

    def __init__(self, cin: int, cout: int, stride: int = 1, first: bool = False):
        super().__init__()
        pre = [] if first else [nn.BatchNorm2d(cin), nn.ReLU(inplace=False)]
        self.body = nn.Sequential(
            *pre,
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
        )
        self.shortcut = nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.body(x) + self.shortcut(x)


class _ResUNet(nn.Module):
    """Levels 0..depth (level depth is the bridge), channels base * 2**level; output: decoder level 0."""

    def __init__(self, in_channels: int, base: int, depth: int):
        super().__init__()
        ch = [base * 2**i for i in range(depth + 1)]
        self.down = nn.ModuleList(
            [_PreActResidualUnit(in_channels, ch[0], first=True)]
            + [_PreActResidualUnit(ch[i - 1], ch[i], stride=2) for i in range(1, depth + 1)]
        )
        self.up = nn.ModuleList([_PreActResidualUnit(ch[i + 1] + ch[i], ch[i]) for i in range(depth)])
        # a pre-activation stack ends unnormalised; as in pre-activation ResNets, BN + ReLU before the
        # classifier, so the features (pooled by the contrastive losses) are normalised like the others'
        self.out_act = nn.Sequential(nn.BatchNorm2d(ch[0]), nn.ReLU(inplace=True))
        self.out_channels = ch[0]

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        skips = []
        for block in self.down:
            x = block(x)
            skips.append(x)
        x = skips.pop()
        for i in reversed(range(len(self.up))):
            skip = skips[i]
            x = self.up[i](torch.cat([_up_to(x, skip), skip], dim=1))
        return self.out_act(x)


# ---- CE-Net ------------------------------------------------------------------------------------------


class BasicBlock(nn.Module):
    """ResNet's basic block: (3x3 conv, BN, ReLU, 3x3 conv, BN) + shortcut, ReLU."""

    def __init__(self, cin: int, cout: int, stride: int = 1):
        super().__init__()
        self.body = nn.Sequential(
            nn.Conv2d(cin, cout, 3, stride=stride, padding=1, bias=False),
            nn.BatchNorm2d(cout),
            nn.ReLU(inplace=True),
            nn.Conv2d(cout, cout, 3, padding=1, bias=False),
            nn.BatchNorm2d(cout),
        )
        self.shortcut = (
            nn.Identity()
            if stride == 1 and cin == cout
            else nn.Sequential(nn.Conv2d(cin, cout, 1, stride=stride, bias=False), nn.BatchNorm2d(cout))
        )

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return F.relu(self.body(x) + self.shortcut(x))


class _DenseAtrousConv(nn.Module):
    """CE-Net's DAC block: four cascaded branches of atrous convs (rates 1, 3, 5), summed with the input.

    As in the paper's code the 3x3 convs are shared between branches and there is no BN.
    """

    def __init__(self, channels: int):
        super().__init__()
        self.rate1 = nn.Conv2d(channels, channels, 3, padding=1, dilation=1)
        self.rate3 = nn.Conv2d(channels, channels, 3, padding=3, dilation=3)
        self.rate5 = nn.Conv2d(channels, channels, 3, padding=5, dilation=5)
        self.mix = nn.Conv2d(channels, channels, 1)
        for m in (self.rate1, self.rate3, self.rate5, self.mix):
            nn.init.zeros_(m.bias)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        r1 = self.rate1(x)
        r13 = self.rate3(r1)
        return (
            x
            + F.relu(r1)
            + F.relu(self.mix(self.rate3(x)))
            + F.relu(self.mix(r13))
            + F.relu(self.mix(self.rate5(r13)))
        )


class _ResidualMultiKernelPool(nn.Module):
    """CE-Net's RMP block: max pools of 2, 3, 5, 6 -> shared 1x1 conv to one channel -> up, concat to input.

    A kernel larger than the map shrinks to the map (small training patches have tiny bottlenecks).
    """

    def __init__(self, channels: int):
        super().__init__()
        self.squeeze = nn.Conv2d(channels, 1, 1)
        self.out_channels = channels + len(_RMP_KERNELS)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        h, w = x.shape[-2:]
        pooled = []
        for k in _RMP_KERNELS:
            kh, kw = min(k, h), min(k, w)
            pooled.append(_up_to(self.squeeze(F.max_pool2d(x, (kh, kw), stride=(kh, kw))), x))
        return torch.cat([x, *pooled], dim=1)


class _CENetDecoderBlock(nn.Sequential):
    """1x1 conv to cin/4, x2 bilinear up + 3x3 conv (the paper's transposed conv), 1x1 conv to cout."""

    def __init__(self, cin: int, cout: int):
        mid = max(cin // 4, 1)
        super().__init__(
            _conv_bn_relu(cin, mid, 1),
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(mid, mid, 3),
            _conv_bn_relu(mid, cout, 1),
        )


class _CENet(nn.Module):
    """Stem (/2, 2 * base), max pool, then stages s = 0..depth-2 at stride 2**(s + 2) with base * 2**(s + 1)
    channels: ResNet-34's 64, 64, 128, 256, 512 at base 32 and depth 5. Output: base channels, full size.
    """

    def __init__(self, in_channels: int, base: int, depth: int):
        super().__init__()
        if depth < 2:
            raise ValueError(f"CE-Net needs depth >= 2 (its stem and max pool downsample twice), got {depth}")
        widths = [base * 2 ** (s + 1) for s in range(depth - 1)]
        self.stem = _conv_bn_relu(in_channels, 2 * base, 7, stride=2)
        stages = []
        cin = 2 * base
        for s, cout in enumerate(widths):
            n_blocks = _RESNET34_BLOCKS[s] if s < len(_RESNET34_BLOCKS) else 2
            stride = 1 if s == 0 else 2  # stage 0 follows the max pool
            stages.append(nn.Sequential(BasicBlock(cin, cout, stride), *[BasicBlock(cout, cout) for _ in range(n_blocks - 1)]))
            cin = cout
        self.stages = nn.ModuleList(stages)
        self.dac = _DenseAtrousConv(cin)
        self.rmp = _ResidualMultiKernelPool(cin)
        # decoders[s] brings stage s + 1's resolution to stage s's (its output is added to stage s's)
        self.decoders = nn.ModuleList(
            [_CENetDecoderBlock(self.rmp.out_channels if s == depth - 3 else widths[s + 1], widths[s]) for s in range(depth - 2)]
        )
        # stage 0 (/4) -> /2 without a skip, then /2 -> full resolution: the paper's last up blocks
        self.to_half = _CENetDecoderBlock(widths[0] if depth > 2 else self.rmp.out_channels, 2 * base)
        self.head = nn.Sequential(
            nn.Upsample(scale_factor=2, mode="bilinear", align_corners=False),
            _conv_bn_relu(2 * base, base, 3),
            _conv_bn_relu(base, base, 3),
        )
        self.out_channels = base

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = F.max_pool2d(self.stem(x), 3, stride=2, padding=1)
        skips = []
        for stage in self.stages:
            x = stage(x)
            skips.append(x)
        x = self.rmp(self.dac(skips.pop()))
        for s in reversed(range(len(self.decoders))):
            x = self.decoders[s](x) + skips[s]
        return self.head(self.to_half(x))


_BODIES = {"unet": _UNet, "unetpp": _UNetPlusPlus, "resunet": _ResUNet, "cenet": _CENet}


# ---- the network -------------------------------------------------------------------------------------


class SegmentationNet(nn.Module):
    """Image (N, in_channels, H, W) -> lesion logits (N, 1, H, W) through one of ``BACKBONES``.

    ``base_channels``: channels of the full-resolution stage (each downsampling doubles them);
    ``depth``: number of downsamplings; H and W must be multiples of 2**depth.
    """

    def __init__(
        self,
        backbone: str = "unet",
        in_channels: int = 3,
        base_channels: int = DEFAULT_BASE_CHANNELS,
        depth: int = DEFAULT_DEPTH,
    ):
        super().__init__()
        if backbone not in _BODIES:
            raise ValueError(f"unknown backbone {backbone!r}; valid names: {', '.join(BACKBONES)}")
        if int(depth) < 1:
            raise ValueError(f"depth must be at least 1, got {depth}")
        if int(base_channels) < 1 or int(in_channels) < 1:
            raise ValueError(f"in_channels and base_channels must be positive, got {in_channels}, {base_channels}")
        self.backbone = backbone
        self.in_channels = int(in_channels)
        self.base_channels = int(base_channels)
        self.depth = int(depth)
        self.body = _BODIES[backbone](self.in_channels, self.base_channels, self.depth)
        self.feature_channels = self.body.out_channels
        self.classifier = nn.Conv2d(self.feature_channels, 1, 1)

    # -- configuration ------------------------------------------------------------------------------

    def config(self) -> dict[str, Any]:
        """The init arguments, JSON-serialisable (for the model folder's config.json)."""
        return {
            "backbone": self.backbone,
            "in_channels": self.in_channels,
            "base_channels": self.base_channels,
            "depth": self.depth,
        }

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "SegmentationNet":
        """Build from ``config()``'s dict; keys that are not init arguments are ignored."""
        keys = ("backbone", "in_channels", "base_channels", "depth")
        return cls(**{k: cfg[k] for k in keys if k in cfg})

    @property
    def size_multiple(self) -> int:
        """Input height and width must be multiples of this."""
        return 2**self.depth

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    # -- forward ------------------------------------------------------------------------------------

    def _check_input(self, x: torch.Tensor) -> None:
        if x.dim() != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"input must be (N, {self.in_channels}, H, W), got {tuple(x.shape)}")
        h, w = x.shape[-2:]
        k = self.size_multiple
        if h % k or w % k:
            need_h, need_w = -(-h // k) * k, -(-w // k) * k
            raise ValueError(
                f"input height and width must be multiples of {k} (2**depth, depth={self.depth}) for the "
                f"{self.backbone!r} backbone, got {h}x{w}; pad it to {need_h}x{need_w}"
            )

    def forward_with_features(self, x: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
        """(logits (N, 1, H, W), features (N, feature_channels, H, W)): the map the classifier reads."""
        self._check_input(x)
        features = self.body(x)
        # under bfloat16 autocast the body runs in bfloat16; the 1x1 classifier (cheap) runs in
        # float32, so that logits (and probabilities near 0 and 1) keep float32's resolution
        with torch.autocast(device_type=features.device.type, enabled=False):
            logits = self.classifier(features.float())
        return logits, features

    def forward(self, x: torch.Tensor, return_features: bool = False):
        """Logits, or (logits, features) with `return_features` (what training calls through DDP's wrapper)."""
        out = self.forward_with_features(x)
        return out if return_features else out[0]
