"""The one exchange format for coarse lesion annotations (ellipses), used by the plugin, CLI and training.

File format (``ellipses.json``)::

    {"image": "IDRiD_55.jpg",
     "ellipses": [{"lesion": "EX", "center_xy": [x, y], "semi_axes": [a, b], "angle_deg": t}]}

x is the column and y the row in full-resolution pixels; pixel (row r, column c) is
centred at x = c, y = r. ``a`` is the semi-axis along the direction at angle ``t``
measured from +x towards +y (clockwise on screen, since y points down), ``b`` the
other one. Optional per-ellipse fields (``id``, ``author``, ``created``) and any
unknown fields, per ellipse and at the top level, are kept on a round trip.
``angle_deg`` may be left out (0). Ellipse indices in messages count from 0.
"""

from __future__ import annotations

import json
import math
import numbers
import uuid
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, Iterable

import numpy as np
from skimage.draw import ellipse as _sk_ellipse

from ..lesions import LESION_CODES, lesion as _lesion
from .atomic import atomic_write_text
from .errors import RetinaInputError

__all__ = [
    "Ellipse",
    "EllipseFile",
    "new_id",
    "normalize_angle_deg",
    "parse_ellipses",
    "load_ellipses",
    "save_ellipses",
    "dumps_ellipses",
    "rasterize_ellipse",
    "rasterize_ellipses",
    "ellipse_bbox",
    "ellipse_to_corners",
    "corners_to_ellipse",
]

ELLIPSE_KEYS = ("lesion", "center_xy", "semi_axes", "angle_deg")
FILE_KEYS = ("image", "ellipses")

# relative slack on the ellipse inequality, so pixel centres exactly on the boundary count as inside
_BOUNDARY_TOL = 1e-9


def new_id() -> str:
    """A fresh ellipse id (12 hex digits of a uuid4: unique enough within one image)."""
    return uuid.uuid4().hex[:12]


def normalize_angle_deg(t: float) -> float:
    """The same axis direction as `t`, in (-90, 90] (an ellipse at t and t + 180 is the same)."""
    t = math.fmod(float(t), 180.0)
    if t <= -90.0:
        t += 180.0
    elif t > 90.0:
        t -= 180.0
    return t


# -- validation ------------------------------------------------------------------------------


def _is_number(v: Any) -> bool:
    # bool is an int subclass but "true" is never a coordinate
    return isinstance(v, numbers.Real) and not isinstance(v, bool)


def _check_lesion(v: Any) -> str:
    if not isinstance(v, str):
        raise ValueError(f"lesion must be one of {', '.join(LESION_CODES)}")
    try:
        return _lesion(v).code
    except ValueError:
        raise ValueError(f"lesion {v!r} is not one of {', '.join(LESION_CODES)}") from None


def _check_pair(v: Any, name: str, positive: bool) -> tuple[float, float]:
    what = "two positive numbers" if positive else "two finite numbers"
    if isinstance(v, (str, bytes)) or not hasattr(v, "__len__") or len(v) != 2:
        raise ValueError(f"{name} must be {what}")
    if not all(_is_number(x) and math.isfinite(x) and (x > 0 or not positive) for x in v):
        raise ValueError(f"{name} must be {what}")
    return (float(v[0]), float(v[1]))


def _check_angle(v: Any) -> float:
    if not (_is_number(v) and math.isfinite(v)):
        raise ValueError("angle_deg must be a finite number")
    return float(v)


def _find_non_finite(v: Any) -> bool:
    # extras are written back with allow_nan=False, so a NaN hidden in them must be caught on input
    if isinstance(v, float):
        return not math.isfinite(v)
    if isinstance(v, dict):
        return any(_find_non_finite(x) for x in v.values())
    if isinstance(v, (list, tuple)):
        return any(_find_non_finite(x) for x in v)
    return False


def _check_extra(extra: Any, reserved: tuple[str, ...]) -> dict:
    if not isinstance(extra, dict):
        raise ValueError("extra fields must be a mapping")
    clash = [k for k in reserved if k in extra]
    if clash:
        raise ValueError(f"extra fields may not repeat {clash[0]}")
    for k, v in extra.items():
        if not isinstance(k, str):
            raise ValueError(f"field name {k!r} is not a string")
        if _find_non_finite(v):
            raise ValueError(f"{k} holds a non-finite number")
    return extra


# -- data model ------------------------------------------------------------------------------


@dataclass
class Ellipse:
    """One coarse lesion annotation; fields are validated and normalised on construction."""

    lesion: str
    center_xy: tuple[float, float]
    semi_axes: tuple[float, float]
    angle_deg: float = 0.0
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        self.lesion = _check_lesion(self.lesion)
        self.center_xy = _check_pair(self.center_xy, "center_xy", positive=False)
        self.semi_axes = _check_pair(self.semi_axes, "semi_axes", positive=True)
        self.angle_deg = _check_angle(self.angle_deg)
        self.extra = _check_extra(self.extra, ELLIPSE_KEYS)

    @property
    def id(self) -> Any:
        return self.extra.get("id")

    def to_dict(self) -> dict:
        return {
            "lesion": self.lesion,
            "center_xy": [self.center_xy[0], self.center_xy[1]],
            "semi_axes": [self.semi_axes[0], self.semi_axes[1]],
            "angle_deg": self.angle_deg,
            **self.extra,
        }

    @classmethod
    def from_dict(cls, d: Any, where: str = "") -> "Ellipse":
        """Validate one JSON ellipse; RetinaInputError "<where>: <field> ..." on any problem."""
        prefix = f"{where}: " if where else ""
        if not isinstance(d, dict):
            raise RetinaInputError(f"{prefix}expected a JSON object")
        for key in ("lesion", "center_xy", "semi_axes"):
            if key not in d:
                raise RetinaInputError(f"{prefix}{key} is missing")
        extra = {k: v for k, v in d.items() if k not in ELLIPSE_KEYS}
        try:
            return cls(d["lesion"], d["center_xy"], d["semi_axes"], d.get("angle_deg", 0.0), extra)
        except ValueError as e:
            raise RetinaInputError(f"{prefix}{e}") from None


@dataclass
class EllipseFile:
    """The content of one ellipses.json: the image's file name, its ellipses, unknown top-level fields."""

    image: str
    ellipses: list[Ellipse] = field(default_factory=list)
    extra: dict = field(default_factory=dict)

    def __post_init__(self) -> None:
        if not isinstance(self.image, str) or not self.image:
            raise ValueError("image must be the image's file name (a non-empty string)")
        self.ellipses = list(self.ellipses)
        if not all(isinstance(e, Ellipse) for e in self.ellipses):
            raise TypeError("ellipses must be Ellipse objects")
        self.extra = _check_extra(self.extra, FILE_KEYS)

    def to_dict(self) -> dict:
        return {"image": self.image, "ellipses": [e.to_dict() for e in self.ellipses], **self.extra}


# -- JSON ------------------------------------------------------------------------------------


def parse_ellipses(obj: Any, source: str = "ellipses.json") -> EllipseFile:
    """Validate decoded JSON; RetinaInputError names `source`, the ellipse index and the field."""
    if not isinstance(obj, dict):
        raise RetinaInputError(f'{source}: expected a JSON object with "image" and "ellipses"')
    if "image" not in obj:
        raise RetinaInputError(f"{source}: image is missing")
    if "ellipses" not in obj:
        raise RetinaInputError(f"{source}: ellipses is missing")
    if not isinstance(obj["ellipses"], list):
        raise RetinaInputError(f"{source}: ellipses must be a list")
    ellipses = []
    seen: dict[Any, int] = {}
    for i, d in enumerate(obj["ellipses"]):
        e = Ellipse.from_dict(d, where=f"{source}: ellipse {i}")
        if e.id is not None:
            # the plugin keys ellipses by id, so a repeated one would merge two annotations
            key = e.id if isinstance(e.id, (str, int)) else json.dumps(e.id)
            if key in seen:
                raise RetinaInputError(f"{source}: ellipse {i}: id {e.id!r} repeats ellipse {seen[key]}")
            seen[key] = i
        ellipses.append(e)
    extra = {k: v for k, v in obj.items() if k not in FILE_KEYS}
    try:
        return EllipseFile(obj["image"], ellipses, extra)
    except ValueError as e:
        raise RetinaInputError(f"{source}: {e}") from None


def load_ellipses(path: str | Path) -> EllipseFile:
    """Read and validate an ellipses file; every problem is a one-line RetinaInputError naming it."""
    path = Path(path)
    try:
        text = path.read_text(encoding="utf-8")
    except FileNotFoundError:
        raise RetinaInputError(f"{path}: no such file") from None
    except UnicodeDecodeError:
        raise RetinaInputError(f"{path}: not UTF-8 text") from None
    except OSError as e:
        raise RetinaInputError(f"{path}: unreadable ({e.strerror or e})") from None
    try:
        obj = json.loads(text)
    except json.JSONDecodeError as e:
        raise RetinaInputError(f"{path}: not valid JSON (line {e.lineno}, column {e.colno})") from None
    return parse_ellipses(obj, source=str(path))


def dumps_ellipses(ef: EllipseFile) -> str:
    """Pretty JSON with one ellipse per line, so diffs of an annotation stay readable."""

    def enc(v: Any, indent: int | None = None) -> str:
        return json.dumps(v, ensure_ascii=False, allow_nan=False, indent=indent)

    lines = ["{", f'  "image": {enc(ef.image)},']
    if ef.ellipses:
        lines.append('  "ellipses": [')
        items = [f"    {enc(e.to_dict())}" for e in ef.ellipses]
        lines.append(",\n".join(items))
        lines.append("  ]")
    else:
        lines.append('  "ellipses": []')
    for k, v in ef.extra.items():
        lines[-1] += ","
        lines.append(f"  {enc(k)}: " + enc(v, indent=2).replace("\n", "\n  "))
    lines.append("}")
    return "\n".join(lines) + "\n"


def save_ellipses(path: str | Path, ef: EllipseFile) -> None:
    """Write atomically: a crash leaves the previous file, never half of the new one."""
    atomic_write_text(Path(path), dumps_ellipses(ef))


# -- geometry --------------------------------------------------------------------------------


def _cos_sin_deg(t: float) -> tuple[float, float]:
    # exact for multiples of 90 degrees, so axis-aligned ellipses get exact corners
    q, r = divmod(float(t), 90.0)
    if r == 0.0:
        return ((1.0, 0.0), (0.0, 1.0), (-1.0, 0.0), (0.0, -1.0))[int(q) % 4]
    rad = math.radians(t)
    return math.cos(rad), math.sin(rad)


def _half_extents(e: Ellipse) -> tuple[float, float]:
    """Half width (along x) and half height (along y) of the axis-aligned bounding box."""
    a, b = e.semi_axes
    cos_t, sin_t = _cos_sin_deg(e.angle_deg)
    return math.hypot(a * cos_t, b * sin_t), math.hypot(a * sin_t, b * cos_t)


def _hw(shape: Iterable[int]) -> tuple[int, int]:
    shape = tuple(shape)
    if len(shape) < 2:
        raise ValueError(f"shape must be (H, W, ...), got {shape}")
    return int(shape[0]), int(shape[1])


def _centre_pixel(e: Ellipse) -> tuple[int, int]:
    """(row, col) of the pixel that contains the centre (pixel c spans x in [c - 0.5, c + 0.5))."""
    x, y = e.center_xy
    return math.floor(y + 0.5), math.floor(x + 0.5)


def _ellipse_pixels(e: Ellipse, h: int, w: int) -> tuple[np.ndarray, np.ndarray]:
    """(rows, cols) of the pixels of `e` inside an (h, w) image; skimage only visits the bounding box."""
    x, y = e.center_xy
    a, b = e.semi_axes
    # skimage: ((dr cos q + dc sin q)/r_radius)^2 + ((dr sin q - dc cos q)/c_radius)^2 < 1 with q = rotation;
    # ours with q = -t, r_radius = b, c_radius = a. Radii grow by sqrt(1 + tol) to turn its "< 1" into "<= 1 + tol".
    grow = math.sqrt(1.0 + _BOUNDARY_TOL)
    rr, cc = _sk_ellipse(y, x, b * grow, a * grow, shape=(h, w), rotation=-math.radians(e.angle_deg))
    if rr.size == 0:
        r, c = _centre_pixel(e)
        if 0 <= r < h and 0 <= c < w:
            return np.array([r]), np.array([c])
    return rr, cc


def rasterize_ellipse(e: Ellipse, shape: Iterable[int]) -> np.ndarray:
    """Bool (H, W) mask of the pixels whose centres lie inside `e` (boundary included), clipped.

    `shape` may be an image's shape; only its first two values are used. An ellipse too
    small to contain any pixel centre still marks the pixel containing its centre, so a
    microaneurysm-sized annotation is never lost.
    """
    h, w = _hw(shape)
    mask = np.zeros((h, w), dtype=bool)
    mask[_ellipse_pixels(e, h, w)] = True
    return mask


def rasterize_ellipses(
    ellipses: Iterable[Ellipse], shape: Iterable[int], lesion: str | None = None
) -> np.ndarray:
    """Union of `rasterize_ellipse` over `ellipses` (only those of lesion code `lesion` if given)."""
    h, w = _hw(shape)
    code = _lesion(lesion).code if lesion is not None else None
    mask = np.zeros((h, w), dtype=bool)
    for e in ellipses:
        if code is None or e.lesion == code:
            mask[_ellipse_pixels(e, h, w)] = True
    return mask


def ellipse_bbox(
    e: Ellipse, margin: float = 0, shape: Iterable[int] | None = None
) -> tuple[int, int, int, int]:
    """(rmin, rmax, cmin, cmax), max exclusive, of the pixels `rasterize_ellipse` can mark, grown by `margin`.

    With `shape` the box is clipped to the image (and may then be empty: rmax == rmin).
    """
    x, y = e.center_xy
    hx, hy = _half_extents(e)
    hx = hx * (1.0 + _BOUNDARY_TOL) + margin
    hy = hy * (1.0 + _BOUNDARY_TOL) + margin
    r_c, c_c = _centre_pixel(e)
    # the centre pixel is included so that the sub-pixel fallback of rasterize_ellipse stays inside
    rmin = min(math.ceil(y - hy), r_c - math.ceil(margin))
    rmax = max(math.floor(y + hy), r_c + math.ceil(margin)) + 1
    cmin = min(math.ceil(x - hx), c_c - math.ceil(margin))
    cmax = max(math.floor(x + hx), c_c + math.ceil(margin)) + 1
    if shape is not None:
        h, w = _hw(shape)
        rmin, rmax = min(max(rmin, 0), h), min(max(rmax, 0), h)
        cmin, cmax = min(max(cmin, 0), w), min(max(cmax, 0), w)
        rmax, cmax = max(rmax, rmin), max(cmax, cmin)
    return rmin, rmax, cmin, cmax


def ellipse_to_corners(e: Ellipse) -> np.ndarray:
    """The 4 corners, (row, col), of the ellipse's rotated bounding box, as napari's Shapes layer stores it.

    corner0 -> corner1 runs along the a axis (direction t), corner1 -> corner2 along the b axis.
    """
    x, y = e.center_xy
    a, b = e.semi_axes
    cos_t, sin_t = _cos_sin_deg(e.angle_deg)
    ux, uy = a * cos_t, a * sin_t  # half the a axis, (x, y)
    vx, vy = -b * sin_t, b * cos_t  # half the b axis: t + 90 degrees
    xy = [
        (x - ux - vx, y - uy - vy),
        (x + ux - vx, y + uy - vy),
        (x + ux + vx, y + uy + vy),
        (x - ux + vx, y - uy + vy),
    ]
    return np.array([(yy, xx) for xx, yy in xy], dtype=float)


def corners_to_ellipse(corners: Any, lesion: str, extra: dict | None = None) -> Ellipse:
    """Inverse of `ellipse_to_corners` for any napari ellipse box; the angle comes out in (-90, 90]."""
    c = np.asarray(corners, dtype=float)
    if c.shape != (4, 2) or not np.isfinite(c).all():
        raise ValueError(f"corners must be 4 finite (row, col) points, got shape {c.shape}")
    row, col = c.mean(axis=0)
    d01 = c[1] - c[0]
    d12 = c[2] - c[1]
    a = math.hypot(d01[0], d01[1]) / 2.0
    b = math.hypot(d12[0], d12[1]) / 2.0
    if not (a > 0 and b > 0):
        raise RetinaInputError(f"a {lesion} ellipse has zero width or height")
    t = normalize_angle_deg(math.degrees(math.atan2(d01[0], d01[1])))  # atan2(dy, dx)
    return Ellipse(lesion, (float(col), float(row)), (a, b), t, dict(extra or {}))
