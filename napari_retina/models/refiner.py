"""Coarse ellipse -> pixel mask with the prototype refinement network (inference).

`EllipseRefiner` loads a model folder (the shipped one by default), cuts one
patch per ellipse (models.patches), runs the network on a batch of them, and
maps the probabilities back, keeping the maximum where patches overlap.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path

import numpy as np

from ..io.ellipses import Ellipse
from ..io.errors import RetinaInputError
from .folder import load_state_dict, read_config
from .patches import PatchGeometry, coarse_patch, paste_max, patch_box, patch_transform, warp_image

# patches are scaled to [-2, 2]: fixed constants, so a model folder alone defines its input
NORM_MEAN = 127.5
NORM_SCALE = 63.75
DEFAULT_THRESHOLD = 0.5


def default_model_dir() -> Path:
    return Path(__file__).resolve().parent / "weights" / "refiner"


def normalise_patch(patch: np.ndarray) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (3, S, S) as the network sees it."""
    return ((patch.astype(np.float32) - NORM_MEAN) / NORM_SCALE).transpose(2, 0, 1).copy()


@dataclass
class RefinedEllipse:
    """One ellipse's result: probabilities on a full-resolution box, inside the ellipse."""

    ellipse: Ellipse
    box: tuple[int, int, int, int]  # r0, r1, c0, c1 in the full image
    prob: np.ndarray  # float32 (r1 - r0, c1 - c0)

    def mask(self, threshold: float) -> np.ndarray:
        return self.prob >= threshold


class EllipseRefiner:
    """The refinement model of a model folder, ready to refine ellipses on CPU or GPU."""

    def __init__(self, model_dir: str | Path | None = None, device: str = "cpu", superpixels: bool | None = None):
        import torch

        from ..nets.refiner import RefinerNet

        self.model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        self.config = read_config(self.model_dir)
        try:
            self.net = RefinerNet.from_config(self.config["net"])
            self.net.load_state_dict(load_state_dict(self.model_dir), strict=True)
        except (KeyError, RuntimeError, TypeError) as e:
            raise RetinaInputError(f"{self.model_dir}: weights do not match config.json ({e})") from None
        self.net.eval().to(device)
        self.device = torch.device(device)
        self.geometry = PatchGeometry(**self.config.get("geometry", {}))
        self.threshold = float(self.config.get("threshold", DEFAULT_THRESHOLD))
        self.superpixels = self.config.get("superpixels", False) if superpixels is None else superpixels
        self.version = str(self.config.get("version", "unknown"))
        self.batch_size = 16
        self._traces: dict[int, object] = {}

    def _traced(self, batch: int):
        """The plain (no superpixel) network as TorchScript, one trace per batch size.

        A traced graph runs without taking Python's GIL between operators: in the annotator
        the GUI thread (napari's drawing is Python) would otherwise slow the worker several-fold.
        """
        if batch not in self._traces:
            import warnings

            import torch

            from ..nets.refiner import PlainRefinerForward

            size = self.geometry.size
            example = (
                torch.zeros(batch, 3, size, size, device=self.device),
                torch.zeros(batch, 1, size, size, device=self.device),
            )
            example[1][..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the shape checks become constants: the patch size is fixed
                self._traces[batch] = torch.jit.trace(PlainRefinerForward(self.net), example, check_trace=False)
        return self._traces[batch]

    def warm_up(self) -> None:
        """Trace the one-ellipse network now (in a loader thread), not when the first ellipse is drawn."""
        if not self.superpixels:
            self._traced(1)

    @property
    def description(self) -> dict:
        return {"model": "refiner", "version": self.version, "folder": str(self.model_dir)}

    def _batch(self, rgb: np.ndarray, ellipses: list[Ellipse]):
        size = self.geometry.size
        mats, imgs, masks = [], [], []
        for e in ellipses:
            m = patch_transform(e, self.geometry)
            mats.append(m)
            imgs.append(normalise_patch(warp_image(rgb, m, size)))
            masks.append(coarse_patch(e, m, size)[None].astype(np.float32))
        return mats, np.stack(imgs), np.stack(masks)

    def patch_probabilities(self, rgb: np.ndarray, ellipses: list[Ellipse], superpixels: bool | None = None):
        """(transforms, probabilities (N, S, S)) for each ellipse."""
        import torch

        sp = self.superpixels if superpixels is None else superpixels
        mats_all, probs_all = [], []
        for i in range(0, len(ellipses), self.batch_size):
            chunk = ellipses[i : i + self.batch_size]
            mats, imgs, masks = self._batch(rgb, chunk)
            img_t, mask_t = torch.from_numpy(imgs).to(self.device), torch.from_numpy(masks).to(self.device)
            with torch.inference_mode():
                if sp:  # maskSLIC runs in Python (scikit-image) between the network's two halves
                    p = self.net.predict_proba(img_t, mask_t, superpixels=True)
                else:
                    p = torch.sigmoid(self._traced(len(chunk))(img_t, mask_t))
            mats_all.extend(mats)
            probs_all.append(p[:, 0].float().cpu().numpy())
        if not probs_all:
            return [], np.zeros((0, self.geometry.size, self.geometry.size), np.float32)
        return mats_all, np.concatenate(probs_all)

    def refine_each(self, rgb: np.ndarray, ellipses: list[Ellipse], superpixels: bool | None = None) -> list[RefinedEllipse]:
        """One result per ellipse, each on its own box (what the annotator keeps per ellipse)."""
        mats, probs = self.patch_probabilities(rgb, ellipses, superpixels)
        out = []
        for e, m, p in zip(ellipses, mats, probs):
            r0, r1, c0, c1 = patch_box(m, self.geometry.size, rgb.shape[:2])
            local = np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), np.float32)
            e_local = Ellipse(e.lesion, (e.center_xy[0] - c0, e.center_xy[1] - r0), e.semi_axes, e.angle_deg)
            # paste into a box-sized canvas with the box origin at (0, 0)
            paste_max(local, p, _to_origin(m, c0, r0), e_local)
            out.append(RefinedEllipse(e, (r0, r1, c0, c1), local))
        return out

    def refine_probability(self, rgb: np.ndarray, ellipses: list[Ellipse], superpixels: bool | None = None) -> np.ndarray:
        """Full-size lesion probability: the maximum over the ellipses' patches (paper 2.1)."""
        full = np.zeros(rgb.shape[:2], np.float32)
        mats, probs = self.patch_probabilities(rgb, ellipses, superpixels)
        for e, m, p in zip(ellipses, mats, probs):
            paste_max(full, p, m, e)
        return full

    def refine_mask(self, rgb, ellipses, threshold: float | None = None, superpixels: bool | None = None) -> np.ndarray:
        t = self.threshold if threshold is None else threshold
        return self.refine_probability(rgb, ellipses, superpixels) >= t

    def timed_refine_one(self, rgb: np.ndarray, e: Ellipse, superpixels: bool | None = None) -> tuple[RefinedEllipse, float]:
        t0 = time.perf_counter()
        r = self.refine_each(rgb, [e], superpixels)[0]
        return r, time.perf_counter() - t0


def _to_origin(m: np.ndarray, c0: int, r0: int) -> np.ndarray:
    """The patch transform for an image whose (0, 0) is the full image's (c0, r0)."""
    out = m.copy()
    out[:, 2] = m[:, 2] + m[:, :2] @ np.array([c0, r0], np.float64)
    return out

