"""Selective sampling of over-represented negatives (the microaneurysm PRN's healthy patches).

Healthy patches far outnumber microaneurysm patches, and most of them are easy. Selective
sampling (van Grinsven et al. 2016, as the microaneurysm paper uses it) draws the negatives of
the next epochs with a probability that rises with their loss under the current network, so
training spends its time on the hard ones. The losses are refreshed every few epochs (the
recipe scores the pool again); a patch never scored yet counts as the mean of those that were,
and every patch keeps a floor probability (`floor` x the mean weight), so an easy patch comes
back now and then and a patch scored low once is not forgotten for good.

NumPy only.
"""

from __future__ import annotations

import numpy as np


class SelectiveSampler:
    """Indices 0..n-1 drawn with probability proportional to max(loss, floor x mean loss)."""

    def __init__(self, n: int, floor: float = 0.1, seed: int = 0):
        if n < 1:
            raise ValueError(f"a sampler needs at least one item, not {n}")
        if not 0 < floor <= 1:
            raise ValueError(f"floor must lie in (0, 1], not {floor}")
        self.n, self.floor = int(n), float(floor)
        self.loss = np.full(self.n, np.nan)  # the last loss seen per item; nan = not scored yet
        self.rng = np.random.default_rng(seed)

    def update(self, indices, losses) -> None:
        """The current network's loss for these items (e.g. per-triplet losses of their negatives)."""
        indices = np.asarray(indices, dtype=np.int64).reshape(-1)
        losses = np.asarray(losses, dtype=np.float64).reshape(-1)
        if indices.shape != losses.shape:
            raise ValueError(f"{indices.size} indices but {losses.size} losses")
        if indices.size and (indices.min() < 0 or indices.max() >= self.n):
            raise ValueError(f"indices must lie in 0..{self.n - 1}")
        if not np.isfinite(losses).all() or (losses < 0).any():
            raise ValueError("losses must be finite and non-negative")
        self.loss[indices] = losses

    def probabilities(self) -> np.ndarray:
        scored = ~np.isnan(self.loss)
        if not scored.any():
            return np.full(self.n, 1.0 / self.n)
        mean = float(self.loss[scored].mean())
        if mean <= 0:  # every scored item is solved: draw uniformly
            return np.full(self.n, 1.0 / self.n)
        w = np.where(scored, self.loss, mean)
        w = np.maximum(w, self.floor * mean)
        return w / w.sum()

    def draw(self, k: int) -> np.ndarray:
        """k indices, with replacement (an epoch may see a hard negative more than once)."""
        return self.rng.choice(self.n, size=int(k), replace=True, p=self.probabilities())
