"""Patch geometry shared by training and inference: one ellipse -> one square patch and back.

A patch is the square around an ellipse, enlarged by a context margin, mapped
onto `size` x `size` pixels by a similarity transform (scale, rotation,
shift). Training draws random transforms (augmentation); inference uses the
plain one. Pixels outside the image read as black, like a fundus surround.
NumPy and OpenCV only (headless, no torch).
"""

from __future__ import annotations

import math
from dataclasses import asdict, dataclass

import cv2
import numpy as np

from ..io.ellipses import Ellipse, rasterize_ellipse


@dataclass(frozen=True)
class PatchGeometry:
    size: int = 256  # patch side fed to the network
    context: float = 0.6  # margin on each side, as a fraction of the ellipse's larger semi-axis
    min_side: float = 48.0  # full-resolution pixels: tiny ellipses still show their surroundings

    def to_dict(self) -> dict:
        return asdict(self)


def patch_transform(
    e: Ellipse, geom: PatchGeometry, scale: float = 1.0, rotation_deg: float = 0.0, shift=(0.0, 0.0)
) -> np.ndarray:
    """2x3 affine matrix mapping image (x, y) to patch (x, y) for ellipse `e`.

    `scale` > 1 zooms out (more context), `rotation_deg` turns the patch, `shift`
    moves the patch centre by a fraction of its side (augmentation).
    """
    a = max(e.semi_axes)
    side = max(geom.min_side, 2.0 * a * (1.0 + geom.context)) * scale
    s = geom.size / side
    th = math.radians(rotation_deg)
    cx = e.center_xy[0] + shift[0] * side
    cy = e.center_xy[1] + shift[1] * side
    c, si = math.cos(th) * s, math.sin(th) * s
    # patch = R*S*(p - centre) + size/2, with the patch centre between its two middle pixels
    half = (geom.size - 1) / 2.0
    return np.array([[c, si, half - c * cx - si * cy], [-si, c, half + si * cx - c * cy]], np.float64)


def warp_image(rgb: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    return cv2.warpAffine(rgb, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)


def warp_mask(mask: np.ndarray, m: np.ndarray, size: int) -> np.ndarray:
    """A binary full-resolution mask in patch coordinates (area-weighted, then >= 0.5)."""
    src = mask.astype(np.uint8) * 255
    out = cv2.warpAffine(src, m, (size, size), flags=cv2.INTER_LINEAR, borderMode=cv2.BORDER_CONSTANT, borderValue=0)
    return out >= 128


def transform_ellipse(e: Ellipse, m: np.ndarray) -> Ellipse:
    """The ellipse in patch coordinates (m is a similarity transform)."""
    x, y = e.center_xy
    px = m[0, 0] * x + m[0, 1] * y + m[0, 2]
    py = m[1, 0] * x + m[1, 1] * y + m[1, 2]
    s = math.hypot(m[0, 0], m[1, 0])
    rot = math.degrees(math.atan2(m[0, 1], m[0, 0]))  # the matrix turns directions by -rot
    return Ellipse(e.lesion, (px, py), (e.semi_axes[0] * s, e.semi_axes[1] * s), e.angle_deg - rot)


def coarse_patch(e: Ellipse, m: np.ndarray, size: int) -> np.ndarray:
    return rasterize_ellipse(transform_ellipse(e, m), (size, size))


def patch_box(m: np.ndarray, size: int, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Full-resolution (r0, r1, c0, c1) covered by the patch, clipped to the image."""
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0], [size - 1, 0], [0, size - 1], [size - 1, size - 1]], np.float64)
    xy = corners @ inv[:, :2].T + inv[:, 2]
    c0, r0 = np.floor(xy.min(axis=0)).astype(int)
    c1, r1 = np.ceil(xy.max(axis=0)).astype(int) + 1
    return max(r0, 0), min(r1, shape[0]), max(c0, 0), min(c1, shape[1])


def paste_max(full: np.ndarray, patch_prob: np.ndarray, m: np.ndarray, e: Ellipse | None = None) -> tuple:
    """Map a patch probability map back and keep the maximum where patches overlap (paper 2.1).

    With `e` given, probabilities outside the ellipse are dropped: a refined mask
    stays inside the ellipse the grader drew. Returns the box written.
    """
    size = patch_prob.shape[0]
    r0, r1, c0, c1 = patch_box(m, size, full.shape[:2])
    if r1 <= r0 or c1 <= c0:
        return (r0, r0, c0, c0)
    # patch coordinates of each box pixel: the same transform, from the box origin
    m_box = m.copy()
    m_box[:, 2] = m[:, 2] + m[:, :2] @ np.array([c0, r0], np.float64)
    back = cv2.warpAffine(
        patch_prob.astype(np.float32),
        m_box,
        (c1 - c0, r1 - r0),
        flags=cv2.INTER_LINEAR | cv2.WARP_INVERSE_MAP,
        borderMode=cv2.BORDER_CONSTANT,
        borderValue=0,
    )
    if e is not None:
        local = Ellipse(e.lesion, (e.center_xy[0] - c0, e.center_xy[1] - r0), e.semi_axes, e.angle_deg)
        back *= rasterize_ellipse(local, back.shape)
    region = full[r0:r1, c0:c1]
    np.maximum(region, back, out=region)
    return (r0, r1, c0, c1)
