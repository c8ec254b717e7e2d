"""Coarse ellipse -> pixel mask with the prototype refinement network (inference).

`EllipseRefiner` loads a model folder (the shipped one by default) and refines
each ellipse at the scale the network was trained on:

- an ellipse whose patch (ellipse plus context) is at most `geometry.max_scale`
  full-resolution pixels per network pixel is cut as one `size` x `size` patch
  (models.patches), batched with the others;
- a larger one (a grader circling a whole lesion cluster) is laid on a grid at
  exactly `max_scale` and covered with overlapping windows; the network's local
  part (features) runs window by window and is blended with complementary ramps,
  and its prototype head runs once over the blended map, as one pass over the
  whole grid would. No ellipse is ever seen coarser than in training.

Each result is a probability map on the ellipse's full-resolution box, zero
outside the ellipse; where ellipses overlap, the maximum counts (paper 2.1).
"""

from __future__ import annotations

import os
import time
from dataclasses import dataclass
from pathlib import Path

import cv2
import numpy as np

from ..io.ellipses import Ellipse, rasterize_ellipse
from ..io.errors import RetinaInputError
from .folder import load_state_dict
from .patches import (
    PatchGeometry,
    blend_weights,
    coarse_patch,
    needs_windows,
    paste_max,
    patch_box,
    patch_transform,
    transform_ellipse,
    warp_image,
    window_overlap,
    window_plan,
)

# patches are scaled to [-2, 2] unless the model folder's config.json says otherwise
NORM_MEAN = 127.5
NORM_SCALE = 63.75
DEFAULT_THRESHOLD = 0.5


def default_model_dir() -> Path:
    from .versions import current_model_dir

    return current_model_dir("refiner")


def normalise_patch(patch: np.ndarray, mean: float = NORM_MEAN, scale: float = NORM_SCALE) -> np.ndarray:
    """uint8 (S, S, 3) -> float32 (3, S, S) as the network sees it."""
    return ((patch.astype(np.float32) - mean) / scale).transpose(2, 0, 1).copy()


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
        from .registry import check_model_folder

        model_dir = Path(model_dir) if model_dir is not None else default_model_dir()
        # through the registry's checks: a refiner folder, weights with the checksum it records
        self._load(model_dir, check_model_folder(model_dir, expect="refiner"), device, superpixels)

    @classmethod
    def from_folder(cls, model_dir: Path, config: dict, device: str = "cpu", superpixels: bool | None = None):
        """The registry's entry point: `config` is the checked config.json of `model_dir`."""
        self = cls.__new__(cls)
        self._load(Path(model_dir), config, device, superpixels)
        return self

    def _load(self, model_dir: Path, config: dict, device: str, superpixels: bool | None) -> None:
        from ..nets.refiner import RefinerNet

        self.model_dir = model_dir
        try:
            net = RefinerNet.from_config(config["net"])
            net.load_state_dict(load_state_dict(self.model_dir), strict=True)
        except (KeyError, RuntimeError, TypeError) as e:
            raise RetinaInputError(f"{self.model_dir}: weights do not match config.json ({e})") from None
        self._setup(net, config, device, superpixels)

    @classmethod
    def from_network(cls, net, config: dict, device: str = "cpu", superpixels: bool | None = None) -> "EllipseRefiner":
        """A refiner around a network held in memory (training validates with this)."""
        self = cls.__new__(cls)
        self.model_dir = None
        self._setup(net, config, device, superpixels)
        return self

    def _setup(self, net, config: dict, device, superpixels: bool | None) -> None:
        import torch

        self.config = config
        self.net = net.eval().to(device)
        self.device = torch.device(device)
        self.geometry = PatchGeometry.from_dict(config.get("geometry", {}))
        norm = config.get("normalisation", {})
        self.norm_mean = float(norm.get("mean", NORM_MEAN))
        self.norm_scale = float(norm.get("scale", NORM_SCALE))
        self.threshold = float(config.get("threshold", DEFAULT_THRESHOLD))
        self.superpixels = config.get("superpixels", False) if superpixels is None else superpixels
        self.version = str(config.get("version", "unknown"))
        self.lesions = tuple(config.get("lesions", ()))
        self.batch_size = 16
        self._traces: dict[tuple[str, int], object] = {}
        # windows of a large ellipse run this many at a time, each on one torch thread
        self.window_threads = min(2, os.cpu_count() or 1)
        self._pool = None

    def _window_pool(self):
        if self._pool is None:
            from concurrent.futures import ThreadPoolExecutor

            self._pool = ThreadPoolExecutor(self.window_threads, thread_name_prefix="napari-retina-windows")
        return self._pool

    def _traced(self, kind: str, batch: int):
        """The plain network ("forward") or its local part ("features") as TorchScript, per batch size.

        A traced graph runs without taking Python's GIL between operators: in the annotator
        the GUI thread (napari's drawing is Python) would otherwise slow the worker several-fold.
        """
        key = (kind, batch)
        if key not in self._traces:
            import warnings

            import torch

            from ..nets.refiner import PlainRefinerForward, RefinerFeatures

            size = self.geometry.size
            example = (
                torch.zeros(batch, 3, size, size, device=self.device),
                torch.zeros(batch, 1, size, size, device=self.device),
            )
            example[1][..., size // 4 : 3 * size // 4, size // 4 : 3 * size // 4] = 1
            module = PlainRefinerForward(self.net) if kind == "forward" else RefinerFeatures(self.net)
            with warnings.catch_warnings(), torch.inference_mode():
                warnings.simplefilter("ignore")  # the shape checks become constants: the patch size is fixed
                traced = torch.jit.trace(module.eval(), example, check_trace=False)
                if self.device.type == "cpu":
                    # batch norms folded into the convolutions, oneDNN kernels: about 25% faster per window on a CPU
                    traced = torch.jit.optimize_for_inference(torch.jit.freeze(traced))
                self._traces[key] = traced
        return self._traces[key]

    def _run_traced(self, kind: str, img, mask):
        """The traced `kind` over a batch of any length, as full batches of `batch_size` and singles.

        Only two traces per kind ever exist (tracing and freezing one costs about half a second):
        a burst of three ellipses or a five-window ellipse never stalls on a new trace.
        """
        import torch

        n, full = img.shape[0], self.batch_size
        outs = []
        for i in range(0, n - n % full, full):
            outs.append(self._traced(kind, full)(img[i : i + full], mask[i : i + full]))
        singles = range(n - n % full, n)
        if kind == "features" and len(singles) > 1 and self.window_threads * torch.get_num_threads() <= (os.cpu_count() or 1):
            # the windows of one large ellipse side by side where torch leaves cores idle (the
            # annotator runs it on half of them): a traced graph runs without the GIL, so each
            # window gets a core (about 1.5x on 2 cores for the 4 windows of a cluster)
            one = self._traced(kind, 1)
            outs.extend(self._window_pool().map(lambda i: one(img[i : i + 1], mask[i : i + 1]), singles))
            singles = ()
        for i in singles:
            outs.append(self._traced(kind, 1)(img[i : i + 1], mask[i : i + 1]))
        if kind == "forward":
            return torch.cat(outs)
        return tuple(torch.cat([o[j] for o in outs]) for j in range(len(outs[0])))

    def warm_up(self) -> None:
        """Trace what one drawn ellipse needs now (in a loader thread), not when the grader draws it."""
        if not self.superpixels:
            self._traced("forward", 1)
            self._traced("features", 1)  # the windows of a large ellipse

    @property
    def description(self) -> dict:
        # kind, version and checksum, never the folder: descriptions go into project files,
        # which travel between machines (a folder name can be a user's or a patient's)
        return {"model": "refiner", "version": self.version, "weights_sha256": self.config.get("weights_sha256")}

    def _normalise(self, patch: np.ndarray) -> np.ndarray:
        return normalise_patch(patch, self.norm_mean, self.norm_scale)

    # --- ellipses that fit one patch ------------------------------------------------------------
    def _batch(self, rgb: np.ndarray, ellipses: list[Ellipse]):
        size = self.geometry.size
        mats, imgs, masks = [], [], []
        for e in ellipses:
            m = patch_transform(e, self.geometry)
            mats.append(m)
            imgs.append(self._normalise(warp_image(rgb, m, size)))
            masks.append(coarse_patch(e, m, size)[None].astype(np.float32))
        return mats, np.stack(imgs), np.stack(masks)

    def patch_probabilities(self, rgb: np.ndarray, ellipses: list[Ellipse], superpixels: bool | None = None):
        """(transforms, probabilities (N, S, S)) for ellipses that fit one patch each."""
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
                    p = torch.sigmoid(self._run_traced("forward", img_t, mask_t))
            mats_all.extend(mats)
            probs_all.append(p[:, 0].float().cpu().numpy())
        if not probs_all:
            return [], np.zeros((0, self.geometry.size, self.geometry.size), np.float32)
        return mats_all, np.concatenate(probs_all)

    # --- larger ellipses: windows at the training scale ----------------------------------------
    def grid_probability(self, rgb: np.ndarray, e: Ellipse, superpixels: bool | None = None, window: int | None = None):
        """(transform, probability on the grid) of a large ellipse, computed window by window.

        `window` (network pixels, default the patch size) only exists so that tests can compare
        the windowed result with one pass over the whole grid (a window as large as the grid).
        """
        import torch
        import torch.nn.functional as F

        from ..nets.refiner import FEATURE_STRIDE

        sp = self.superpixels if superpixels is None else superpixels
        geom = self.geometry
        plan = window_plan(e, geom)
        h, w = plan.shape
        grid_img = self._normalise(warp_image_rect(rgb, plan.m, (h, w)))
        grid_mask = rasterize_ellipse(transform_ellipse(e, plan.m), (h, w)).astype(np.float32)[None]
        (th, tw), origins, traced = (geom.size, geom.size), plan.origins, True
        if window is not None and window != geom.size:
            th, tw, traced = min(window, h), min(window, w), False
            origins = _origins(plan.shape, window, window_overlap(geom))
        k = FEATURE_STRIDE
        overlap = window_overlap(geom) // k
        fused_sum = None
        with torch.inference_mode():
            for i in range(0, len(origins), self.batch_size):
                chunk = origins[i : i + self.batch_size]
                imgs = np.stack([grid_img[:, y : y + th, x : x + tw] for y, x in chunk])
                masks = np.stack([grid_mask[:, y : y + th, x : x + tw] for y, x in chunk])
                img_t, mask_t = torch.from_numpy(imgs).to(self.device), torch.from_numpy(masks).to(self.device)
                if traced:
                    fused, _ = self._run_traced("features", img_t, mask_t)
                else:
                    fused, _ = self.net.features(img_t, mask_t)
                fused = fused.float().cpu().numpy()
                if fused_sum is None:
                    fused_sum = np.zeros((fused.shape[1], h // k, w // k), np.float32)
                for (y, x), f in zip(chunk, fused):
                    cy, cx, ny, nx = y // k, x // k, th // k, tw // k
                    wy = blend_weights(ny, cy, h // k, overlap)
                    wx = blend_weights(nx, cx, w // k, overlap)
                    fused_sum[:, cy : cy + ny, cx : cx + nx] += f * np.outer(wy, wx).astype(np.float32)
            fused_t = torch.from_numpy(fused_sum)[None].to(self.device)
            soft = F.avg_pool2d(torch.from_numpy(grid_mask)[None].to(self.device), k)
            logits = self.net.head(fused_t, soft, bool(sp))
            prob = torch.sigmoid(F.interpolate(logits, size=(h, w), mode="bilinear", align_corners=False))
        return plan.m, prob[0, 0].float().cpu().numpy()

    # --- results -----------------------------------------------------------------------------------
    def refine_each(self, rgb: np.ndarray, ellipses: list[Ellipse], superpixels: bool | None = None) -> list[RefinedEllipse]:
        """One result per ellipse, each on its own box (what the annotator keeps per ellipse)."""
        small = [i for i, e in enumerate(ellipses) if not needs_windows(e, self.geometry)]
        mats, probs = self.patch_probabilities(rgb, [ellipses[i] for i in small], superpixels)
        mapped: dict[int, tuple[np.ndarray, np.ndarray]] = dict(zip(small, zip(mats, probs)))
        for i, e in enumerate(ellipses):
            if i not in mapped:
                mapped[i] = self.grid_probability(rgb, e, superpixels)
        out = []
        for i, e in enumerate(ellipses):
            m, p = mapped[i]
            r0, r1, c0, c1 = patch_box(m, p.shape, rgb.shape[:2])
            local = np.zeros((max(r1 - r0, 0), max(c1 - c0, 0)), np.float32)
            e_local = Ellipse(e.lesion, (e.center_xy[0] - c0, e.center_xy[1] - r0), e.semi_axes, e.angle_deg)
            # paste into a box-sized canvas with the box origin at (0, 0)
            paste_max(local, p, _to_origin(m, c0, r0), e_local)
            out.append(RefinedEllipse(e, (r0, r1, c0, c1), local))
        return out

    def refine_probability(self, rgb: np.ndarray, ellipses: list[Ellipse], superpixels: bool | None = None) -> np.ndarray:
        """Full-size lesion probability: the maximum over the ellipses' results (paper 2.1)."""
        full = np.zeros(rgb.shape[:2], np.float32)
        for r in self.refine_each(rgb, ellipses, superpixels):
            r0, r1, c0, c1 = r.box
            region = full[r0:r1, c0:c1]
            np.maximum(region, r.prob, out=region)
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



def warp_image_rect(rgb: np.ndarray, m: np.ndarray, shape: tuple[int, int]) -> np.ndarray:
    """`warp_image` onto a (rows, cols) grid."""
    return cv2.warpAffine(rgb, m, (shape[1], shape[0]), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def _origins(shape: tuple[int, int], window: int, overlap: int) -> tuple[tuple[int, int], ...]:
    """Window origins covering `shape` (a window as large as the grid gives one)."""
    stride = window - overlap
    ys = list(range(0, max(shape[0] - window, 0) + 1, stride)) if shape[0] > window else [0]
    xs = list(range(0, max(shape[1] - window, 0) + 1, stride)) if shape[1] > window else [0]
    return tuple((y, x) for y in ys for x in xs)
