"""Coarse-annotation simulator: fine lesion masks -> the rough ellipses a grader would draw.

Paper (Yu, Dang, Zhou, Chen and Ding, "Coarse Retinal Lesion Annotations Refinement via
Prototypical Learning", OMIA workshop at MICCAI 2022), section 3.1: the chain
smoothing -> dilating -> expanding -> clustering the connected components with DBSCAN ->
fitting one ellipse per cluster. Here, per 8-connected component of the fine mask:

1. smoothing: Gaussian blur of the component, thresholded at 0.5, united with the component;
2. dilating: by a disk of `dilation_radius` pixels;
3. expanding: the second-moment ellipse of the result, grown until it covers the result, then
   scaled by `expansion` and floored at `min_semi_axis` (a 3 px microaneurysm still gets a
   hand-sized circle);
4. clustering: component centroids go to DBSCAN (min_samples=1, i.e. single linkage), eps
   found by bisection so that the number of clusters is round(n / reduction); at reduction
   1.0 every component is its own cluster;
5. fitting: per cluster, the second-moment ellipse of its components' expanded ellipses, grown
   until it contains them; then a seeded jitter (centre, axes, angle) and a final growth
   until every fine pixel of the cluster lies inside (so the ellipses always cover the lesion).

Everything is deterministic for a given mask, lesion, reduction and seed. The constants in
`DEFAULT_PARAMS` are calibrated (benchmarks/calibrate_coarse.py) so that at reduction 1.0
the image-level coarse IoU on the IDRiD training images is within 2 points of the paper's
Table 1 "Initial Coarse" (measured there on the IDRiD test split).
"""

from __future__ import annotations

import math
from collections.abc import Iterable, Mapping
from dataclasses import dataclass

import cv2
import numpy as np
from scipy import ndimage as ndi

from .io.ellipses import Ellipse, EllipseFile, normalize_angle_deg, rasterize_ellipses
from .lesions import LESION_CODES, REFINED_LESIONS, lesion as _lesion

__all__ = [
    "CoarseParams",
    "DEFAULT_PARAMS",
    "SIMULATED_LESIONS",
    "simulate_coarse_ellipses",
    "simulate_coarse_file",
    "coarse_mask",
    "cluster_components",
]

# the lesions the paper simulates (lesions.REFINED_LESIONS, kept under this name for callers); OD only when asked for
SIMULATED_LESIONS: tuple[str, ...] = REFINED_LESIONS

_EIGHT = np.ones((3, 3), dtype=bool)  # 8-connectivity, the project-wide convention
# a pixel is a unit square: its own variance 1/12 keeps one-pixel regions from a zero-size fit
_PIXEL_VAR = 1.0 / 12.0
# growth beyond the farthest point so that float rounding never leaves it outside
_COVER_SLACK = 1e-6
# points sampled on each expanded component ellipse when a cluster ellipse must contain it
_RIM_POINTS = 32


@dataclass(frozen=True)
class CoarseParams:
    """Constants of the simulator for one lesion class (lengths in full-resolution pixels)."""

    blur_sigma: float = 2.0  # Gaussian smoothing of each component (0: none)
    dilation_radius: int = 2  # disk dilation after smoothing (0: none)
    expansion: float = 1.5  # factor on the semi-axes of each component's covering ellipse
    min_semi_axis: float = 8.0  # floor on each semi-axis after expansion
    centre_jitter: float = 0.1  # sd of the centre shift, as a fraction of each semi-axis
    axis_jitter: float = 0.1  # sd of the log scale factor of each semi-axis
    angle_jitter_deg: float = 10.0  # sd of the angle change

    def __post_init__(self) -> None:
        for name in ("blur_sigma", "dilation_radius", "min_semi_axis", "centre_jitter", "axis_jitter", "angle_jitter_deg"):
            v = getattr(self, name)
            if not (math.isfinite(v) and v >= 0):
                raise ValueError(f"{name} must be a finite number >= 0, got {v!r}")
        if not (math.isfinite(self.expansion) and self.expansion > 0):
            raise ValueError(f"expansion must be a finite number > 0, got {self.expansion!r}")


# calibrated with benchmarks/calibrate_coarse.py: at reduction 1.0 on the 54 IDRiD training images the coarse
# IoU is MA 9.7, SE 48.9, EX 15.1, HE 32.6 % against the paper's 9.6, 49.3, 15.0, 33.2 (test split); OD is not calibrated
DEFAULT_PARAMS: dict[str, CoarseParams] = {
    "MA": CoarseParams(blur_sigma=1.0, dilation_radius=2, expansion=2.5, min_semi_axis=25.0),
    "SE": CoarseParams(blur_sigma=3.0, dilation_radius=3, expansion=1.0, min_semi_axis=10.0),
    "EX": CoarseParams(blur_sigma=2.0, dilation_radius=4, expansion=1.75, min_semi_axis=25.0),
    "HE": CoarseParams(blur_sigma=2.0, dilation_radius=3, expansion=1.2, min_semi_axis=16.0),
    "OD": CoarseParams(blur_sigma=4.0, dilation_radius=4, expansion=1.1, min_semi_axis=20.0),
}


# -- ellipse geometry (x = column, y = row; a along angle t from +x towards +y) ---------------


@dataclass
class _Fit:
    cx: float
    cy: float
    a: float
    b: float
    t: float  # radians

    def rho(self, xy: np.ndarray) -> np.ndarray:
        """Normalised radius of points (N, 2) as (x, y): <= 1 inside the ellipse."""
        c, s = math.cos(self.t), math.sin(self.t)
        dx = xy[:, 0] - self.cx
        dy = xy[:, 1] - self.cy
        u = (dx * c + dy * s) / self.a
        v = (-dx * s + dy * c) / self.b
        return np.sqrt(u * u + v * v)

    def grow_to_cover(self, xy: np.ndarray) -> None:
        # the ellipse keeps its centre, shape and angle; only its size grows
        if len(xy):
            r = float(self.rho(xy).max())
            if r * (1.0 + _COVER_SLACK) > 1.0:
                self.a *= r * (1.0 + _COVER_SLACK)
                self.b *= r * (1.0 + _COVER_SLACK)

    def rim(self, n: int = _RIM_POINTS) -> np.ndarray:
        q = np.linspace(0.0, 2.0 * math.pi, n, endpoint=False)
        c, s = math.cos(self.t), math.sin(self.t)
        u, v = self.a * np.cos(q), self.b * np.sin(q)
        return np.stack([self.cx + u * c - v * s, self.cy + u * s + v * c], axis=1)

    def covariance(self) -> np.ndarray:
        """Second moments (x, y) of the filled ellipse: semi-axis a has variance a^2 / 4."""
        c, s = math.cos(self.t), math.sin(self.t)
        rot = np.array([[c, -s], [s, c]])
        return rot @ np.diag([self.a**2 / 4.0, self.b**2 / 4.0]) @ rot.T


def _fit_from_moments(mean: np.ndarray, cov: np.ndarray) -> _Fit:
    """The ellipse with the given centre and second moments (a filled ellipse's own moments)."""
    vals, vecs = np.linalg.eigh(cov)  # ascending
    vals = np.maximum(vals, _PIXEL_VAR)
    vx, vy = vecs[0, 1], vecs[1, 1]
    return _Fit(float(mean[0]), float(mean[1]), 2.0 * math.sqrt(vals[1]), 2.0 * math.sqrt(vals[0]), math.atan2(vy, vx))


# -- per component ----------------------------------------------------------------------------


@dataclass
class _Component:
    centroid: np.ndarray  # (x, y) of the fine pixels
    hull: np.ndarray  # (N, 2) (x, y) pixel centres on the convex hull of the fine pixels
    ellipse: _Fit  # smoothed, dilated, covering, expanded
    area: float  # area of `ellipse`, the weight of the component in its cluster's moments


def _disk(radius: int) -> np.ndarray:
    return cv2.getStructuringElement(cv2.MORPH_ELLIPSE, (2 * radius + 1, 2 * radius + 1))


def _component(labels: np.ndarray, index: int, box: tuple[slice, slice], p: CoarseParams) -> _Component:
    h, w = labels.shape
    margin = int(p.dilation_radius) + int(math.ceil(3.0 * p.blur_sigma)) + 1
    r0, r1 = max(box[0].start - margin, 0), min(box[0].stop + margin, h)
    c0, c1 = max(box[1].start - margin, 0), min(box[1].stop + margin, w)
    fine = labels[r0:r1, c0:c1] == index

    rr, cc = np.nonzero(fine)
    pts = np.stack([cc + c0, rr + r0], axis=1).astype(np.float64)
    centroid = pts.mean(axis=0)
    if len(pts) >= 3:
        hull = cv2.convexHull(pts.astype(np.float32)).reshape(-1, 2).astype(np.float64)
    else:
        hull = pts

    work = fine
    if p.blur_sigma > 0:
        # smoothing fills the notches and gaps a grader's hand does not follow
        blurred = ndi.gaussian_filter(fine.astype(np.float32), p.blur_sigma, mode="constant")
        work = (blurred >= 0.5) | fine
    if p.dilation_radius > 0:
        work = cv2.dilate(work.astype(np.uint8), _disk(int(p.dilation_radius))).astype(bool)

    rr, cc = np.nonzero(work)
    wpts = np.stack([cc + c0, rr + r0], axis=1).astype(np.float64)
    mean = wpts.mean(axis=0)
    d = wpts - mean
    cov = d.T @ d / len(wpts) + _PIXEL_VAR * np.eye(2)
    fit = _fit_from_moments(mean, cov)
    whull = cv2.convexHull(wpts.astype(np.float32)).reshape(-1, 2).astype(np.float64) if len(wpts) >= 3 else wpts
    fit.grow_to_cover(whull)
    fit.a = max(fit.a * p.expansion, p.min_semi_axis)
    fit.b = max(fit.b * p.expansion, p.min_semi_axis)
    return _Component(centroid, hull, fit, math.pi * fit.a * fit.b)


# -- clustering -------------------------------------------------------------------------------


def _dbscan_labels(points: np.ndarray, eps: float) -> np.ndarray:
    from sklearn.cluster import DBSCAN

    labels = DBSCAN(eps=eps, min_samples=1).fit_predict(points)
    # noise (none with min_samples=1, kept for safety) becomes one cluster per point
    noise = labels < 0
    if noise.any():
        labels = labels.copy()
        labels[noise] = labels.max() + 1 + np.arange(int(noise.sum()))
    # renumber by first member so the order never depends on DBSCAN internals
    _, first, inverse = np.unique(labels, return_index=True, return_inverse=True)
    order = np.argsort(np.argsort(first))
    return order[inverse]


def cluster_components(points: np.ndarray, n_clusters: int, iterations: int = 60) -> np.ndarray:
    """Cluster labels (0..k-1, numbered by first member) of `points` (N, 2) by DBSCAN.

    eps is searched by bisection so that the number of clusters is as close to `n_clusters`
    as DBSCAN allows (ties between distances can make the exact number unreachable).
    """
    points = np.asarray(points, dtype=np.float64)
    n = len(points)
    if n_clusters >= n:
        return np.arange(n)
    if n_clusters <= 1:
        return np.zeros(n, dtype=np.intp)
    # count(eps) falls as eps grows: lo keeps more clusters than wanted, hi at most as many
    lo, hi = 0.0, float(np.ptp(points, axis=0).max()) + 1.0
    lo_labels, hi_labels = np.arange(n), np.zeros(n, dtype=np.intp)
    for _ in range(iterations):
        mid = 0.5 * (lo + hi)
        labels = _dbscan_labels(points, mid)
        k = int(labels.max()) + 1
        if k == n_clusters:
            return labels
        if k > n_clusters:
            lo, lo_labels = mid, labels
        else:
            hi, hi_labels = mid, labels
        if hi - lo < 1e-9:
            break
    k_lo, k_hi = int(lo_labels.max()) + 1, int(hi_labels.max()) + 1
    return lo_labels if k_lo - n_clusters < n_clusters - k_hi else hi_labels


# -- public API -------------------------------------------------------------------------------


def simulate_coarse_ellipses(
    mask: np.ndarray,
    lesion: str,
    reduction: float = 1.0,
    seed: int = 0,
    params: CoarseParams | None = None,
) -> list[Ellipse]:
    """Coarse ellipses of lesion `lesion` simulated from its fine (H, W) bool `mask`.

    round(n / reduction) ellipses (at least 1) for the mask's n 8-connected components; every
    lesion pixel lies inside (the union of) them. Same inputs and `seed` -> identical
    ellipses. Each carries extra {"id": "sim-<LESION>-<i>", "simulated": True}.
    """
    code = _lesion(lesion).code
    mask = np.asarray(mask, dtype=bool)
    if mask.ndim != 2:
        raise ValueError(f"mask must be 2-D (H, W), got shape {mask.shape}")
    if not (math.isfinite(reduction) and reduction >= 1.0):
        raise ValueError(f"reduction must be a number >= 1.0, got {reduction!r}")
    p = params if params is not None else DEFAULT_PARAMS[code]

    labels, n = ndi.label(mask, structure=_EIGHT)
    if n == 0:
        return []
    # scipy numbers components in raster order of their first pixel: a deterministic order
    comps = [_component(labels, i + 1, box, p) for i, box in enumerate(ndi.find_objects(labels))]
    groups = cluster_components(np.array([c.centroid for c in comps]), max(1, round(n / reduction)))

    # one generator per (seed, lesion): the lesions of one image get different jitter
    rng = np.random.default_rng([int(seed) % 2**64, LESION_CODES.index(code)])
    out: list[Ellipse] = []
    for g in range(int(groups.max()) + 1):
        members = [comps[i] for i in np.flatnonzero(groups == g)]
        if len(members) == 1:
            fit = _Fit(**vars(members[0].ellipse))
        else:
            # moments of the members' ellipses as one shape (overlaps counted twice), then cover them
            w = np.array([m.area for m in members])
            centres = np.array([[m.ellipse.cx, m.ellipse.cy] for m in members])
            mean = (w[:, None] * centres).sum(axis=0) / w.sum()
            cov = sum(wi * (m.ellipse.covariance() + np.outer(ci - mean, ci - mean)) for wi, m, ci in zip(w, members, centres))
            fit = _fit_from_moments(mean, cov / w.sum())
            fit.grow_to_cover(np.concatenate([m.ellipse.rim() for m in members]))
        # a hand-drawn ellipse is off centre, off size and off angle; always 5 draws per ellipse
        du, dv, sa, sb, dt = rng.standard_normal(5)
        c, s = math.cos(fit.t), math.sin(fit.t)
        u, v = du * p.centre_jitter * fit.a, dv * p.centre_jitter * fit.b
        fit.cx += u * c - v * s
        fit.cy += u * s + v * c
        fit.a *= math.exp(sa * p.axis_jitter)
        fit.b *= math.exp(sb * p.axis_jitter)
        fit.t += math.radians(dt * p.angle_jitter_deg)
        # whatever the jitter did, the ellipse must still contain every fine pixel of its cluster
        fit.grow_to_cover(np.concatenate([m.hull for m in members]))
        out.append(
            Ellipse(
                code,
                (fit.cx, fit.cy),
                (fit.a, fit.b),
                normalize_angle_deg(math.degrees(fit.t)),
                {"id": f"sim-{code}-{g}", "simulated": True},
            )
        )
    return out


def simulate_coarse_file(
    masks: Mapping[str, np.ndarray],
    image_name: str,
    reduction: float = 1.0,
    seed: int = 0,
    lesions: Iterable[str] = SIMULATED_LESIONS,
    params: Mapping[str, CoarseParams] | None = None,
) -> EllipseFile:
    """The simulated ellipses.json content for one image: every lesion of `lesions` in `masks`.

    `masks` maps lesion codes to fine (H, W) bool masks; lesions without a mask or with an
    empty one get no ellipses. Pass lesions=("MA", "SE", "EX", "HE", "OD") to include the disc.
    """
    wanted = {_lesion(c).code for c in lesions}
    given = {_lesion(c).code: m for c, m in masks.items()}
    ellipses: list[Ellipse] = []
    for code in LESION_CODES:  # the lesion table's order, whatever order the dicts have
        if code in wanted and code in given:
            p = params.get(code) if params else None
            ellipses += simulate_coarse_ellipses(given[code], code, reduction=reduction, seed=seed, params=p)
    return EllipseFile(image_name, ellipses, {"simulated": {"reduction": float(reduction), "seed": int(seed)}})


def coarse_mask(ellipses: Iterable[Ellipse], shape: Iterable[int], lesion: str) -> np.ndarray:
    """Bool (H, W) union of the rasterised ellipses of lesion `lesion` (the coarse annotation)."""
    return rasterize_ellipses(ellipses, shape, lesion=lesion)
