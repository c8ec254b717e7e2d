"""What a network's input goes through before scaling and standardisation (headless, NumPy + OpenCV).

`preprocess` in a model folder's config.json names it (`PREPROCESSING`), and inference
(models.segmenter.network_input, models.microaneurysms) and training apply it with
`apply_preprocessing`, so a network never sees an image prepared differently.

- "none": the photograph as it is.
- "enhance": `subtract_local_background`, Graham's local contrast normalisation,
  I_pre = 4 I - 4 G_sigma * I + c per channel inside the field of view (after
  Sarhan et al., "Multi-scale Microaneurysms Segmentation Using Embedding Triplet Loss",
  MICCAI 2019, Fig. 1; the microaneurysm networks'
  input).

This is the networks' preprocessing, not a display aid: fundus.enhance_display_contrast
(CLAHE on lightness) is the one the viewer shows.
"""

from __future__ import annotations

import cv2
import numpy as np

# config.json's `preprocess` values
PREPROCESSING = ("none", "enhance")

# Graham's constant: 4 (I - G * I) + 128 puts "no local contrast" at mid-grey in 8 bits. The
# paper prints c = 1024/30, which is Graham's blur scale (radius / 30 at a radius of 1024 px)
# rather than an offset; for 8-bit images 128 is the offset that keeps dark and bright detail
# symmetric around the middle.
OFFSET = 128.0
SIGMA_FRACTION = 1.0 / 60.0  # sigma = field-of-view width / 60 = radius / 30 (Graham)
_BLUR_STEP = 8  # the background estimate is computed at 1/8 scale: it is smooth at sigma >> 8 px


def subtract_local_background(rgb: np.ndarray, fov: np.ndarray | None = None, sigma: float | None = None,
                              offset: float = OFFSET) -> np.ndarray:
    """uint8 (H, W, 3): 4 I - 4 G_sigma * I + offset per channel, `offset` outside the field of view.

    The local background G_sigma * I is a normalised convolution over the field of view only
    (blur(I * fov) / blur(fov)), so the dark surround does not light up the rim. `sigma`
    defaults to the field of view's width / 60. A sigma of ~60 px on a 4288-px photograph
    would take seconds as a full-size Gaussian; the background is smooth at that scale, so it
    is blurred at 1/8 size and resized back (where sigma >= 16 px; finer sigmas run full size).
    """
    rgb = np.asarray(rgb)
    if rgb.ndim != 3 or rgb.shape[2] != 3:
        raise ValueError(f"expected an RGB image (H, W, 3), got shape {rgb.shape}")
    h, w = rgb.shape[:2]
    fov = np.ones((h, w), bool) if fov is None else np.asarray(fov, bool)
    if sigma is None:
        cols = np.flatnonzero(fov.any(axis=0))
        width = (cols[-1] - cols[0] + 1) if cols.size else w
        sigma = max(1.0, width * SIGMA_FRACTION)
    m8 = fov.astype(np.uint8)
    masked = cv2.bitwise_and(rgb, rgb, mask=m8)  # the surround counts for nothing
    step = _BLUR_STEP if sigma >= 2 * _BLUR_STEP else 1
    size = (max(1, w // step), max(1, h // step))
    if step > 1:
        small_i = cv2.resize(masked, size, interpolation=cv2.INTER_AREA).astype(np.float32)
        small_m = cv2.resize(m8.astype(np.float32), size, interpolation=cv2.INTER_AREA)
    else:
        small_i, small_m = masked.astype(np.float32), m8.astype(np.float32)
    num = cv2.GaussianBlur(small_i, (0, 0), sigma / step, borderType=cv2.BORDER_REFLECT)
    den = cv2.GaussianBlur(small_m, (0, 0), sigma / step, borderType=cv2.BORDER_REFLECT)
    background = num / np.maximum(den, 1e-6)[..., None]
    if step > 1:  # the ratio is smooth at this scale: resize it once, not its two parts
        background = cv2.resize(background, (w, h), interpolation=cv2.INTER_LINEAR)
    # 4 I - 4 B + offset, rounded and saturated to 8 bits in one OpenCV pass (0.2 s against
    # 2.4 s in NumPy on a 4288 x 2848 photograph)
    out = cv2.addWeighted(np.ascontiguousarray(rgb, np.uint8), 4.0, background, -4.0, float(offset), dtype=cv2.CV_8U)
    out[~fov] = int(round(offset))
    return out


def apply_preprocessing(rgb: np.ndarray, fov: np.ndarray, preprocess: str = "none") -> np.ndarray:
    """`rgb` as the model's `preprocess` (config.json) prepares it, at full resolution."""
    if preprocess not in PREPROCESSING:
        raise ValueError(f"preprocess must be one of {PREPROCESSING}, not {preprocess!r}")
    if preprocess == "enhance":
        return subtract_local_background(rgb, fov)
    return rgb
