"""The microaneurysm patch-wise refinement network (PRN): is the centre of this patch a microaneurysm?

The paper (Sarhan, Albarqouni, Yigitsoy, Navab and Eslami, "Multi-scale Microaneurysms
Segmentation Using Embedding Triplet Loss", MICCAI 2019, section 2) adapts ResNet-50
with one downsampling removed to 129 x 129 patches, takes the embedding after global average
pooling, and trains it with a cosine triplet loss plus cross-entropy. ResNet-50 holds about
23.5 M parameters (94 MiB in float32), over the 15 MiB a model folder may hold and slow on a
2-core CPU, so this is a slimmer residual network written in torch.nn, trained from scratch:

- the same shape of network: a stem, then four stages of residual blocks, each starting
  with a stride-2 block (129 -> 65 -> 33 -> 17 -> 9), global average pooling. ResNet's 7x7
  stride-2 stem and max pool would take two of the few downsamplings a 129-px patch allows
  (the paper removes one); here the stem is one 3x3 convolution at full resolution, so a
  microaneurysm (IDRiD's: 10-30 px across) is seen at full detail before the first downsampling;
- basic blocks (two 3x3 convolutions, ResNet-18/34 style) instead of bottlenecks, two per
  stage instead of 3-4-6-3, widths 16-32-64-128 instead of 256-512-1024-2048: about 0.7 M
  parameters (2.7 MiB in float32), about 0.2 GMAC per patch, so a few hundred candidates
  per image are scored in seconds on 2 CPU cores (twice the widths cost 4x the time);
- the embedding is the 128-d vector after global average pooling (the paper's choice of
  layer), then one linear layer to one logit (sigmoid: P(microaneurysm at the centre)).

``forward(x)`` returns (N,) logits; ``forward(x, return_embedding=True)`` returns
(logits, (N, embedding_dim) embeddings) for the triplet loss. Any input size works (global
pooling); 129 x 129 is the size it is trained and run at. Imports only torch.
"""

from __future__ import annotations

from typing import Any

import torch
from torch import nn

from .segmentation import BasicBlock  # CE-Net's encoder block: the same ResNet basic block

__all__ = ["PatchClassifier", "PATCH_SIZE"]

PATCH_SIZE = 129  # the paper's PRN patch: odd, so one pixel is the centre


class PatchClassifier(nn.Module):
    """A slim residual classifier of patch centres with a global-average-pooled embedding."""

    def __init__(self, in_channels: int = 3, widths: tuple[int, ...] = (16, 32, 64, 128), blocks: int = 2):
        super().__init__()
        self.in_channels, self.widths, self.blocks = int(in_channels), tuple(int(w) for w in widths), int(blocks)
        self.stem = nn.Sequential(
            nn.Conv2d(in_channels, widths[0], 3, padding=1, bias=False), nn.BatchNorm2d(widths[0]), nn.ReLU(inplace=True)
        )
        stages, cin = [], widths[0]
        for i, w in enumerate(widths):
            layers = [BasicBlock(cin, w, stride=2)] + [BasicBlock(w, w) for _ in range(blocks - 1)]
            stages.append(nn.Sequential(*layers))
            cin = w
        self.stages = nn.Sequential(*stages)
        self.pool = nn.AdaptiveAvgPool2d(1)
        self.head = nn.Linear(cin, 1)

    @property
    def embedding_dim(self) -> int:
        return self.widths[-1]

    def config(self) -> dict[str, Any]:
        return {"kind": "patch_classifier", "in_channels": self.in_channels, "widths": list(self.widths),
                "blocks": self.blocks, "patch_size": PATCH_SIZE}

    @classmethod
    def from_config(cls, cfg: dict[str, Any]) -> "PatchClassifier":
        return cls(in_channels=int(cfg.get("in_channels", 3)), widths=tuple(cfg.get("widths", (16, 32, 64, 128))),
                   blocks=int(cfg.get("blocks", 2)))

    def num_parameters(self) -> int:
        return sum(p.numel() for p in self.parameters())

    def forward(self, x: torch.Tensor, return_embedding: bool = False):
        if x.ndim != 4 or x.shape[1] != self.in_channels:
            raise ValueError(f"expected (N, {self.in_channels}, H, W) patches, got shape {tuple(x.shape)}")
        emb = self.pool(self.stages(self.stem(x))).flatten(1)
        with torch.autocast(device_type=emb.device.type, enabled=False):  # the head in float32 under autocast
            emb = emb.float()
            logits = self.head(emb).squeeze(1)
        return (logits, emb) if return_embedding else logits
