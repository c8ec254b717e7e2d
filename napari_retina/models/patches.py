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
    # the largest full-resolution pixels per network pixel seen in training: an ellipse whose
    # patch would be coarser is refined window by window at this scale instead (never coarser)
    max_scale: float = 2.0
    # windowed ellipses: the least margin around the ellipse's bounding box, in network pixels
    # (the grid rounds up to whole windows, so most margins are larger); 16 and 32 score the
    # same on validation (README), and 16 saves a row or column of windows for many ellipses
    window_context: int = 16
    # windowed ellipses: overlap of neighbouring windows, in network pixels (multiple of 16)
    window_overlap: int = 64

    def to_dict(self) -> dict:
        return asdict(self)

    @classmethod
    def from_dict(cls, d: dict) -> "PatchGeometry":
        """From a config.json entry; keys it does not know are ignored (older model folders)."""
        known = set(cls.__dataclass_fields__)
        return cls(**{k: v for k, v in (d or {}).items() if k in known})


def natural_side(e: Ellipse, geom: PatchGeometry) -> float:
    """Full-resolution side of the single patch around `e` (ellipse plus context)."""
    return max(geom.min_side, 2.0 * max(e.semi_axes) * (1.0 + geom.context))


def needs_windows(e: Ellipse, geom: PatchGeometry) -> bool:
    """True when one patch would show `e` coarser than the network was trained on."""
    return natural_side(e, geom) / geom.size > geom.max_scale + 1e-9


def similarity_transform(centre_xy, px_per_net: float, rotation_deg: float, out_shape: tuple[int, int]) -> np.ndarray:
    """2x3 matrix: image (x, y) -> output (x, y), `centre_xy` at the output's centre.

    `px_per_net` full-resolution pixels per output pixel; the output is turned by `rotation_deg`.
    """
    s = 1.0 / px_per_net
    th = math.radians(rotation_deg)
    c, si = math.cos(th) * s, math.sin(th) * s
    cx, cy = centre_xy
    hx, hy = (out_shape[1] - 1) / 2.0, (out_shape[0] - 1) / 2.0
    return np.array([[c, si, hx - c * cx - si * cy], [-si, c, hy + si * cx - c * cy]], np.float64)


def ellipse_half_extent(e: Ellipse) -> tuple[float, float]:
    """Half width and half height of the ellipse's axis-aligned bounding box."""
    a, b = e.semi_axes
    t = math.radians(e.angle_deg)
    return math.hypot(a * math.cos(t), b * math.sin(t)), math.hypot(a * math.sin(t), b * math.cos(t))


@dataclass(frozen=True)
class WindowPlan:
    """A large ellipse on a network-pixel grid at `geom.max_scale`, covered by overlapping windows.

    `m` maps image (x, y) to grid (x, y); the grid is `shape` (rows, cols) network pixels;
    `origins` are the windows' top-left grid pixels (row, col), `geom.size` square each.
    """

    m: np.ndarray
    shape: tuple[int, int]
    origins: tuple[tuple[int, int], ...]


def _axis_windows(length: float, size: int, stride: int) -> tuple[int, list[int]]:
    n = max(1, math.ceil((length - size) / stride) + 1)
    return size + (n - 1) * stride, [k * stride for k in range(n)]


def window_overlap(geom: PatchGeometry) -> int:
    """The overlap windows use: `geom.window_overlap`, at most a quarter of a (small) patch, in 16 px steps."""
    if geom.window_overlap % 16 or geom.window_overlap < 0:
        raise ValueError(f"window_overlap must be a non-negative multiple of 16, not {geom.window_overlap}")
    return min(geom.window_overlap, geom.size // 4 // 16 * 16)


def window_plan(e: Ellipse, geom: PatchGeometry) -> WindowPlan:
    """The grid and windows that refine `e` at `geom.max_scale` (axis-aligned, centred on `e`)."""
    hx, hy = ellipse_half_extent(e)
    stride = geom.size - window_overlap(geom)
    width, xs = _axis_windows(2 * hx / geom.max_scale + 2 * geom.window_context, geom.size, stride)
    height, ys = _axis_windows(2 * hy / geom.max_scale + 2 * geom.window_context, geom.size, stride)
    m = similarity_transform(e.center_xy, geom.max_scale, 0.0, (height, width))
    return WindowPlan(m, (height, width), tuple((y, x) for y in ys for x in xs))


def blend_weights(length: int, start: int, total: int, overlap: int) -> np.ndarray:
    """1-D weights of one window along one axis, in feature cells; the windows' weights sum to 1.

    Where two windows overlap (`overlap` cells), each ignores the `overlap // 4` cells next to its
    own border (what a convolution there saw was zero padding, not image), and the two hand over
    with complementary raised-cosine ramps in between: no seams, no periodic pattern.
    """
    w = np.ones(length, np.float64)
    if overlap <= 0:
        return w
    trim = overlap // 4
    ramp_len = overlap - 2 * trim
    ramp = 0.5 - 0.5 * np.cos(np.pi * (np.arange(ramp_len) + 0.5) / ramp_len)
    if start > 0:  # a window before this one
        w[:trim] = 0.0
        w[trim : trim + ramp_len] = ramp
    if start + length < total:  # a window after this one
        w[length - trim :] = 0.0
        w[length - trim - ramp_len : length - trim] = ramp[::-1]
    return w


def patch_transform(
    e: Ellipse, geom: PatchGeometry, scale: float = 1.0, rotation_deg: float = 0.0, shift=(0.0, 0.0)
) -> np.ndarray:
    """2x3 affine matrix mapping image (x, y) to patch (x, y) for ellipse `e`.

    `scale` > 1 zooms out (more context), `rotation_deg` turns the patch, `shift`
    moves the patch centre by a fraction of its side (augmentation).
    """
    side = natural_side(e, geom) * scale
    centre = (e.center_xy[0] + shift[0] * side, e.center_xy[1] + shift[1] * side)
    # patch = R*S*(p - centre) + size/2, with the patch centre between its two middle pixels
    return similarity_transform(centre, side / geom.size, rotation_deg, (geom.size, geom.size))


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


def patch_box(m: np.ndarray, size, shape: tuple[int, int]) -> tuple[int, int, int, int]:
    """Full-resolution (r0, r1, c0, c1) covered by the patch, clipped to the image.

    `size` is the patch side, or its (rows, cols) for a rectangular grid.
    """
    ph, pw = (size, size) if np.isscalar(size) else size
    inv = cv2.invertAffineTransform(m)
    corners = np.array([[0, 0], [pw - 1, 0], [0, ph - 1], [pw - 1, ph - 1]], np.float64)
    xy = corners @ inv[:, :2].T + inv[:, 2]
    c0, r0 = np.floor(xy.min(axis=0)).astype(int)
    c1, r1 = np.ceil(xy.max(axis=0)).astype(int) + 1
    return max(r0, 0), min(r1, shape[0]), max(c0, 0), min(c1, shape[1])


def paste_max(full: np.ndarray, patch_prob: np.ndarray, m: np.ndarray, e: Ellipse | None = None) -> tuple:
    """Map a patch probability map back and keep the maximum where patches overlap (paper 2.1).

    With `e` given, probabilities outside the ellipse are dropped: a refined mask
    stays inside the ellipse the grader drew. Returns the box written.
    """
    r0, r1, c0, c1 = patch_box(m, patch_prob.shape, full.shape[:2])
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
