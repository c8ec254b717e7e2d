"""Whole-image lesion segmentation (hard exudates first): a model folder -> a probability map.

`LesionSegmenter` loads a segmentation model folder through the registry and turns a
fundus photograph into a full-size lesion probability map:

1. the field of view is found (fundus.field_of_view_mask) unless given;
2. the image is resized to the model's working scale (`input_scale` in config.json: the
   network was trained there, and it decides speed: half scale is a quarter of the pixels)
   and standardised per channel over the field of view (`network_input`, the one function
   training uses too, so a model never sees inputs prepared differently);
3. the network runs window by window over the field of view only (models.tiling: blended
   overlaps, progress per batch of tiles, cancellable between tiles);
4. the map is resized back to full resolution and is 0 outside the field of view and on
   its rim (`rim_margin` in config.json, a fraction of the field of view's width): the
   bright, blurred edge of the camera's aperture is where an exudate model's strongest false
   positives lie, and hardly any exudate (0.14 % of the IDRiD training split's exudate
   pixels lie within 20 px of the dark surround, in 1.6 % of the field of view). Only the
   edge against the dark surround counts: where the image border cuts the circle, the
   retina goes on and so do its lesions.

`segment` adds the binary mask at the model's threshold and the uint8 map (0-255) that
`napari-retina segment` writes as `<stem>_<LESION>_prob.tif`.
"""

from __future__ import annotations

import time
from dataclasses import dataclass
from pathlib import Path
from typing import Callable, Optional

import cv2
import numpy as np

from ..io.errors import RetinaInputError
from .preprocess import apply_preprocessing

DEFAULT_TILE = 512  # network pixels per window side
DEFAULT_OVERLAP = 128  # network pixels shared by neighbouring windows


def scaled_size(shape, scale: float) -> tuple[int, int]:
    """(width, height), as cv2.resize takes it, of an image of `shape` (rows, cols, ...) at `scale`:
    every map and overlay at a model's working scale has this size, so they line up."""
    h, w = shape[:2]
    return max(1, round(w * scale)), max(1, round(h * scale))


def network_input(rgb: np.ndarray, fov: np.ndarray, scale: float, preprocess: str = "none",
                  dtype=np.float32) -> tuple[np.ndarray, np.ndarray]:
    """(float (3, h, w) standardised image, bool (h, w) field of view) at `scale` of the full size.

    `preprocess` (config.json; models.preprocess.PREPROCESSING) is applied first, at full
    resolution: "enhance" is the local contrast normalisation the microaneurysm networks
    take (models.preprocess.subtract_local_background). Each
    channel is standardised with the mean and standard deviation of its field-of-view pixels
    (fundus photographs differ widely in exposure and colour); outside it is 0.
    """
    rgb = apply_preprocessing(rgb, fov, preprocess)
    if scale != 1.0:
        size = scaled_size(rgb.shape, scale)
        small = cv2.resize(rgb, size, interpolation=cv2.INTER_AREA)
        small_fov = cv2.resize(fov.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
    else:
        small, small_fov = rgb, fov.astype(bool)
    # OpenCV's masked statistics: one pass in float64, no copy of the field of view's pixels (a
    # float32 NumPy mean over axis 0 of 9 megapixels drifted by 4 % of the red channel's mean
    # and took seconds); then each channel standardised as its own contiguous plane
    mean, std = cv2.meanStdDev(small, mask=small_fov.astype(np.uint8) if small_fov.any() else None)
    mean, std = mean.ravel(), np.maximum(std.ravel(), 1.0)
    x = np.empty((small.shape[2], *small.shape[:2]), np.float32)
    outside = ~small_fov
    for c, plane in enumerate(cv2.split(small)):
        np.subtract(plane, np.float32(mean[c]), out=x[c], dtype=np.float32)
        x[c] *= np.float32(1.0 / std[c])
        x[c][outside] = 0.0
    return x if x.dtype == dtype else x.astype(dtype), small_fov


def probability_to_uint8(prob: np.ndarray) -> np.ndarray:
    """A probability map as stored in `_prob.tif`: round(p * 255)."""
    return np.round(np.clip(prob, 0.0, 1.0) * 255.0).astype(np.uint8)


@dataclass
class Segmentation:
    """One image's result at full resolution."""

    lesion: str
    prob: np.ndarray  # float32 (H, W) in [0, 1], 0 outside the field of view
    threshold: float
    seconds: float

    @property
    def mask(self) -> np.ndarray:
        """The lesion at the threshold, decided on the stored uint8 map, so mask and map always agree."""
        from ..metrics import level_threshold

        return self.prob_uint8 >= level_threshold(self.threshold)

    @property
    def prob_uint8(self) -> np.ndarray:
        return probability_to_uint8(self.prob)


class LesionSegmenter:
    """A lesion segmentation model folder, ready to map whole fundus images on CPU or GPU."""

    def __init__(self, model_dir: str | Path, device: str = "cpu"):
        from .registry import check_model_folder

        model_dir = Path(model_dir)
        self._load(model_dir, check_model_folder(model_dir), device)

    @classmethod
    def from_folder(cls, model_dir: Path, config: dict, device: str = "cpu") -> "LesionSegmenter":
        """The registry's entry point: `config` is the checked config.json of `model_dir`."""
        self = cls.__new__(cls)
        self._load(Path(model_dir), config, device)
        return self

    @classmethod
    def from_network(cls, net, config: dict, device: str = "cpu") -> "LesionSegmenter":
        """Around a network in memory (validation during training)."""
        self = cls.__new__(cls)
        self.model_dir = None
        self._setup(net, config, device)
        return self

    def _load(self, model_dir: Path, config: dict, device: str) -> None:
        from ..nets.segmentation import SegmentationNet
        from .folder import load_state_dict

        self.model_dir = model_dir
        try:
            net = SegmentationNet.from_config(config["net"])
            net.load_state_dict(load_state_dict(model_dir), strict=True)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise RetinaInputError(f"{model_dir}: weights do not match config.json ({str(e).splitlines()[0]})") from None
        self._setup(net, config, device)

    def _setup(self, net, config: dict, device: str) -> None:
        import torch

        self.config = config
        self.device = torch.device(device)
        self.net = net.eval().to(self.device)
        self.lesion = str(config.get("lesion", "EX"))
        self.scale = float(config.get("input_scale", 1.0))
        self.tile = int(config.get("tile", DEFAULT_TILE))
        self.overlap = int(config.get("overlap", DEFAULT_OVERLAP))
        self.threshold = float(config.get("threshold", 0.5))
        self.version = str(config.get("version", "unknown"))
        self.kind = str(config.get("model", "segmenter"))
        self.stride_multiple = 2 ** int(config.get("net", {}).get("depth", 4))
        self.batch = int(config.get("batch", 2))
        self.rim_margin = float(config.get("rim_margin", 0.0))
        self.preprocess = str(config.get("preprocess", "none"))

    @property
    def description(self) -> dict:
        # kind, version and checksum, never the folder: descriptions go into project files,
        # which travel between machines (a folder name can be a user's or a patient's)
        return {"model": self.kind, "version": self.version, "weights_sha256": self.config.get("weights_sha256")}

    def tile_count(self, shape: tuple[int, int], fov: np.ndarray) -> int:
        """How many windows `probability` runs on an image of `shape` with this field of view."""
        from .tiling import plan_tiles

        size = scaled_size(shape, self.scale)
        small_fov = fov if self.scale == 1.0 else cv2.resize(fov.astype(np.uint8), size, interpolation=cv2.INTER_NEAREST).astype(bool)
        tile = min(self.tile, _round_up(max(small_fov.shape), self.stride_multiple))
        return len(plan_tiles(small_fov.shape, tile, min(self.overlap, tile // 2), small_fov, self.stride_multiple).origins)

    def probability(
        self,
        rgb: np.ndarray,
        fov: np.ndarray | None = None,
        progress: Optional[Callable[[int, int], None]] = None,
        cancelled: Optional[Callable[[], bool]] = None,
        preview: Optional[Callable[[np.ndarray], None]] = None,
        on_block: Optional[Callable[[tuple[int, int, int, int], np.ndarray], None]] = None,
        block: int = 512,
        preview_every: float = 0.0,
    ) -> np.ndarray:
        """Full-size float32 lesion probability (0 outside the field of view).

        `progress(done, total)` is called per batch of tiles; `cancelled()` is checked between
        them and stops the run with `tiling.TilingCancelled`; `preview(map)` receives the map at
        the working scale as uint8 (0-255) as it fills, tile by tile, at most once per
        `preview_every` seconds (one array, updated in place: copy what you keep; only the
        tiles' pixels are converted each time, not the whole map). `on_block(box, prob)`
        receives each `block` x `block` full-resolution block (box = r0, r1, c0, c1, on the
        grid from (0, 0)) as soon as no tile still to run can change it, with exactly the
        values the returned map has there, so a caller can use the map while it is made.
        """
        from ..fundus import field_of_view_mask
        from .precision import inference_precision
        from .tiling import predict_tiled, torch_predictor

        h, w = rgb.shape[:2]
        if fov is None:
            fov = field_of_view_mask(rgb)
        x, small_fov = network_input(rgb, fov, self.scale, self.preprocess)
        tile = min(self.tile, _round_up(max(x.shape[1:]), self.stride_multiple))

        shown = np.zeros(x.shape[1:], np.uint8) if preview is not None else None  # = probability_to_uint8(out[0])
        last_preview = [float("-inf")]

        def partial(out: np.ndarray, final: np.ndarray, box: tuple[int, int, int, int]) -> None:
            if preview is not None:
                r0, r1, c0, c1 = box  # the only pixels this batch changed
                shown[r0:r1, c0:c1] = probability_to_uint8(out[0, r0:r1, c0:c1])
                now = time.monotonic()
                if now - last_preview[0] >= preview_every:
                    last_preview[0] = now
                    preview(shown)
            if blocks is not None:
                blocks.update(out[0], final)

        out_fov = inside_rim(fov, self.rim_margin)  # where the map may be non-zero
        blocks = _BlockFeed(on_block, block, (h, w), x.shape[1:], out_fov, small_fov) if on_block is not None else None
        with inference_precision(self.device):  # bfloat16 where the processor computes it natively
            small = predict_tiled(
                torch_predictor(self.net, self.device), x, tile, min(self.overlap, tile // 2), fov=small_fov,
                batch=self.batch, stride_multiple=self.stride_multiple, progress=progress, cancelled=cancelled,
                partial=partial if (preview is not None or blocks is not None) else None,
            )[0]
        return _full_size(small, out_fov)

    def segment(
        self, rgb: np.ndarray, fov: np.ndarray | None = None, progress=None, cancelled=None, preview=None,
        on_block=None, block: int = 512, preview_every: float = 0.0,
    ) -> Segmentation:
        t0 = time.perf_counter()
        prob = self.probability(rgb, fov, progress=progress, cancelled=cancelled, preview=preview,
                                on_block=on_block, block=block, preview_every=preview_every)
        return Segmentation(self.lesion, prob, self.threshold, time.perf_counter() - t0)


def inside_rim(fov: np.ndarray, margin: float) -> np.ndarray:
    """The field of view less a rim `margin` x its width wide along the dark surround (not along the image border)."""
    fov = np.asarray(fov, bool)
    if margin <= 0 or not fov.any():
        return fov
    cols = np.flatnonzero(fov.any(axis=0))
    px = margin * (cols[-1] - cols[0] + 1)
    # OpenCV's distance transform counts the image border as far away, unlike a dark surround
    dist = cv2.distanceTransform(fov.astype(np.uint8), cv2.DIST_L2, cv2.DIST_MASK_5)
    return dist > px


def _full_size(small: np.ndarray, fov: np.ndarray) -> np.ndarray:
    """A working-scale map (0 outside the field of view) at full size, 0 outside the field of view, in [0, 1]."""
    h, w = fov.shape
    prob = small if small.shape == (h, w) else cv2.resize(small, (w, h), interpolation=cv2.INTER_LINEAR)
    prob = np.array(prob, np.float32, copy=prob is small)
    prob[~fov] = 0.0
    return np.clip(prob, 0.0, 1.0, out=prob)


class _BlockFeed:
    """Hands out full-resolution blocks of the map as soon as their values are final.

    A full-resolution pixel interpolates the working-scale pixels around it, so a block is
    final when every working-scale pixel within one pixel of its footprint is final. Its
    values come from the same resize of the same numbers as the returned map (bilinear
    interpolation reads only a pixel's neighbours), so they are the same.
    """

    def __init__(self, emit, block: int, full: tuple[int, int], small: tuple[int, int], fov, small_fov):
        self.emit, self.fov, self.small_fov = emit, fov, small_fov
        h, w = full
        sh, sw = small
        # an integer upscale (half scale of an even-sized photograph: 2): a block's values come from
        # resizing its own footprint, the same numbers as the whole map's resize at a fraction of
        # the cost (the whole map took 0.1-0.2 s per update); otherwise the whole map is resized
        self.k = h // sh if (h % sh == 0 and w % sw == 0 and h // sh == w // sw) else None
        self.small_shape = small
        self.todo = []
        for r0 in range(0, h, block):
            for c0 in range(0, w, block):
                box = (r0, min(r0 + block, h), c0, min(c0 + block, w))
                # working-scale footprint of the box, one pixel wider on each side
                fr0 = max(0, int(np.floor(box[0] * sh / h)) - 1)
                fr1 = min(sh, int(np.ceil(box[1] * sh / h)) + 1)
                fc0 = max(0, int(np.floor(box[2] * sw / w)) - 1)
                fc1 = min(sw, int(np.ceil(box[3] * sw / w)) + 1)
                self.todo.append((box, (slice(fr0, fr1), slice(fc0, fc1))))

    def update(self, small: np.ndarray, final: np.ndarray) -> None:
        ready = [(box, fp) for box, fp in self.todo if final[fp].all()]
        if not ready:
            return
        self.todo = [t for t in self.todo if t not in ready]
        if self.k is None:
            masked = np.where(self.small_fov, small, 0.0).astype(np.float32)  # as predict_tiled ends
            prob = _full_size(masked, self.fov)
            for box, _ in ready:
                self.emit(box, prob[box[0] : box[1], box[2] : box[3]].copy())
            return
        for box, _ in ready:
            self.emit(box, self._block_values(small, box))

    def _block_values(self, small: np.ndarray, box: tuple[int, int, int, int]) -> np.ndarray:
        """`_full_size` of the whole map, cut to `box`, computed from the box's footprint alone (integer
        upscale k: output pixel x reads input x / k - (k - 1) / 2k and its neighbour, so a footprint
        one pixel wider on each side, resized by exactly k, holds the same values k pixels in)."""
        k, (sh, sw) = self.k, self.small_shape
        r0, r1, c0, c1 = box
        sr0, sr1 = max(0, r0 // k - 1), min(sh, -(-r1 // k) + 1)
        sc0, sc1 = max(0, c0 // k - 1), min(sw, -(-c1 // k) + 1)
        crop = np.where(self.small_fov[sr0:sr1, sc0:sc1], small[sr0:sr1, sc0:sc1], 0.0).astype(np.float32)
        if k > 1:
            crop = cv2.resize(crop, ((sc1 - sc0) * k, (sr1 - sr0) * k), interpolation=cv2.INTER_LINEAR)
        out = np.array(crop[r0 - k * sr0 : r1 - k * sr0, c0 - k * sc0 : c1 - k * sc0], np.float32)
        out[~self.fov[r0:r1, c0:c1]] = 0.0
        return np.clip(out, 0.0, 1.0, out=out)


def _round_up(n: int, m: int) -> int:
    return -(-int(n) // m) * m
