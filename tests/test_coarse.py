"""The coarse-annotation simulator on small synthetic masks."""

from __future__ import annotations

import numpy as np
import pytest

from napari_retina.coarse import (
    DEFAULT_PARAMS,
    CoarseParams,
    cluster_components,
    coarse_mask,
    SIMULATED_LESIONS,
    simulate_coarse_ellipses,
    simulate_coarse_file,
)
from napari_retina.io.ellipses import EllipseFile, rasterize_ellipse
from napari_retina.lesions import REFINED_LESIONS

NO_JITTER = CoarseParams(blur_sigma=0, dilation_radius=0, expansion=1.0, min_semi_axis=1.0,
                         centre_jitter=0, axis_jitter=0, angle_jitter_deg=0)
# strong jitter and shrinking: only the final covering step keeps the lesion inside
WILD = CoarseParams(blur_sigma=1.5, dilation_radius=1, expansion=0.5, min_semi_axis=1.0,
                    centre_jitter=0.6, axis_jitter=0.5, angle_jitter_deg=60)


def disc(mask: np.ndarray, r: int, c: int, radius: float) -> None:
    yy, xx = np.mgrid[: mask.shape[0], : mask.shape[1]]
    mask[(yy - r) ** 2 + (xx - c) ** 2 <= radius**2] = True


def assorted_mask(h: int = 160, w: int = 220) -> np.ndarray:
    """Blobs of many shapes: discs, a single pixel, a diagonal line, an L, a ring, a lesion on the border."""
    m = np.zeros((h, w), bool)
    disc(m, 30, 30, 6)
    disc(m, 40, 60, 2)
    m[100, 20] = True
    for i in range(25):  # a thin diagonal streak: 8-connected only
        m[60 + i, 100 + i] = True
    m[120:150, 150:154] = True  # an L
    m[146:150, 150:190] = True
    yy, xx = np.mgrid[:h, :w]
    d2 = (yy - 40) ** 2 + (xx - 170) ** 2
    m[(d2 <= 15**2) & (d2 >= 11**2)] = True  # a ring: its moment ellipse is smaller than it
    m[0:5, 80:95] = True  # clipped by the image border
    disc(m, 155, 60, 4)
    return m


def n_components(mask: np.ndarray) -> int:
    from scipy import ndimage as ndi

    return ndi.label(mask, structure=np.ones((3, 3)))[1]


def as_dicts(ellipses):
    return [e.to_dict() for e in ellipses]


# -- determinism ------------------------------------------------------------------------------


def test_same_seed_gives_identical_ellipses():
    m = assorted_mask()
    for red in (1.0, 2.0):
        a = simulate_coarse_ellipses(m, "EX", reduction=red, seed=7)
        b = simulate_coarse_ellipses(m.copy(), "EX", reduction=red, seed=7)
        assert as_dicts(a) == as_dicts(b)


def test_different_seed_gives_different_jitter():
    m = assorted_mask()
    a = simulate_coarse_ellipses(m, "HE", seed=1)
    b = simulate_coarse_ellipses(m, "HE", seed=2)
    assert len(a) == len(b)
    assert all(x.center_xy != y.center_xy for x, y in zip(a, b))
    assert all(x.semi_axes != y.semi_axes for x, y in zip(a, b))


def test_without_jitter_the_seed_changes_nothing():
    m = assorted_mask()
    a = simulate_coarse_ellipses(m, "HE", seed=1, params=NO_JITTER)
    b = simulate_coarse_ellipses(m, "HE", seed=2, params=NO_JITTER)
    assert as_dicts(a) == as_dicts(b)


# -- coverage ---------------------------------------------------------------------------------


@pytest.mark.parametrize("reduction", [1.0, 2.0])
@pytest.mark.parametrize("lesion", ["MA", "SE", "EX", "HE"])
def test_ellipses_cover_every_lesion_pixel(lesion, reduction):
    m = assorted_mask()
    for seed in range(3):
        ellipses = simulate_coarse_ellipses(m, lesion, reduction=reduction, seed=seed)
        assert not (m & ~coarse_mask(ellipses, m.shape, lesion)).any()


@pytest.mark.parametrize("reduction", [1.0, 1.5, 2.0, 4.0])
def test_ellipses_cover_the_lesion_whatever_the_jitter(reduction):
    m = assorted_mask()
    for seed in range(10):
        ellipses = simulate_coarse_ellipses(m, "MA", reduction=reduction, seed=seed, params=WILD)
        assert not (m & ~coarse_mask(ellipses, m.shape, "MA")).any()


def test_each_ellipse_covers_its_own_component_at_reduction_1():
    from scipy import ndimage as ndi

    m = assorted_mask()
    labels, n = ndi.label(m, structure=np.ones((3, 3)))
    ellipses = simulate_coarse_ellipses(m, "HE", seed=3, params=WILD)
    covered = [rasterize_ellipse(e, m.shape) for e in ellipses]
    # components are numbered in raster order and so are the ellipses
    for i in range(n):
        assert not ((labels == i + 1) & ~covered[i]).any()


# -- counts -----------------------------------------------------------------------------------


def test_one_ellipse_per_8_connected_component():
    m = np.zeros((80, 80), bool)
    m[10, 10] = m[11, 11] = True  # touching diagonally: one component
    m[12, 12:15] = True  # and still the same one
    disc(m, 40, 40, 5)
    m[70, 5] = True
    m[5, 70:75] = True
    assert n_components(m) == 4
    ellipses = simulate_coarse_ellipses(m, "MA")
    assert len(ellipses) == 4
    assert len({e.id for e in ellipses}) == 4
    assert all(e.lesion == "MA" and e.extra["simulated"] is True for e in ellipses)


def pairs_mask() -> tuple[np.ndarray, list[tuple[tuple[int, int], tuple[int, int]]]]:
    """8 pairs of blobs: 12 px apart within a pair, at least 100 px between pairs."""
    m = np.zeros((320, 520), bool)
    pairs = []
    for i in range(8):
        r, c = 60 + 200 * (i // 4), 60 + 130 * (i % 4)
        disc(m, r, c, 3)
        disc(m, r + 8, c + 9, 2)
        pairs.append(((r, c), (r + 8, c + 9)))
    return m, pairs


def test_reduction_2_groups_nearby_blobs_into_half_as_many_ellipses():
    m, pairs = pairs_mask()
    assert n_components(m) == 16
    for seed in range(3):
        ellipses = simulate_coarse_ellipses(m, "MA", reduction=2.0, seed=seed)
        assert len(ellipses) == 8
        # each ellipse holds one pair: the clustering grouped the nearby blobs
        for (p, q) in pairs:
            holders = [e for e in ellipses if rasterize_ellipse(e, m.shape)[p] and rasterize_ellipse(e, m.shape)[q]]
            assert holders, f"no ellipse holds both blobs of the pair at {p}"


def test_number_of_ellipses_is_regions_over_reduction():
    m, _ = pairs_mask()
    assert len(simulate_coarse_ellipses(m, "EX", reduction=1.0)) == 16
    # 16 / 8 = 2: the two rows of pairs (200 px apart) are the last to merge
    assert len(simulate_coarse_ellipses(m, "EX", reduction=8.0)) == 2
    assert len(simulate_coarse_ellipses(m, "EX", reduction=100.0)) == 1  # never fewer than one


def test_empty_mask_gives_no_ellipses():
    empty = np.zeros((50, 60), bool)
    assert simulate_coarse_ellipses(empty, "MA") == []
    assert simulate_coarse_ellipses(empty, "EX", reduction=2.0) == []


def test_bad_arguments():
    m = assorted_mask()
    with pytest.raises(ValueError, match="reduction"):
        simulate_coarse_ellipses(m, "MA", reduction=0.5)
    with pytest.raises(ValueError, match="2-D"):
        simulate_coarse_ellipses(m[None], "MA")
    with pytest.raises(ValueError, match="unknown lesion"):
        simulate_coarse_ellipses(m, "XX")
    with pytest.raises(ValueError, match="expansion"):
        CoarseParams(expansion=0)


# -- geometry ---------------------------------------------------------------------------------


def test_centre_and_size_follow_the_conventions():
    m = np.zeros((100, 160), bool)
    disc(m, 50, 80, 10)  # row 50, column 80
    (e,) = simulate_coarse_ellipses(m, "HE", params=NO_JITTER)
    assert e.center_xy == pytest.approx((80.0, 50.0), abs=1e-6)  # x is the column
    # a radius-10 digital disc: its moment circle (radius 10.07) already covers the farthest centres
    assert e.semi_axes == pytest.approx((10.0, 10.0), abs=0.15)
    twice = CoarseParams(**{**vars(NO_JITTER), "expansion": 2.0})
    (e2,) = simulate_coarse_ellipses(m, "HE", params=twice)
    assert e2.semi_axes == pytest.approx((2 * e.semi_axes[0],) * 2)


def test_elongated_lesion_gives_an_ellipse_along_it():
    m = np.zeros((100, 120), bool)
    for i in range(80):  # a streak going right 2, down 1: atan(1/2) = 26.6 degrees from +x towards +y
        m[20 + i // 2, 20 + i] = True
        m[21 + i // 2, 20 + i] = True
    (e,) = simulate_coarse_ellipses(m, "HE", params=NO_JITTER)
    assert e.angle_deg == pytest.approx(26.57, abs=2.0)
    assert e.semi_axes[0] > 5 * e.semi_axes[1]
    # mirrored (going up-right) the angle changes sign
    (f,) = simulate_coarse_ellipses(m[::-1], "HE", params=NO_JITTER)
    assert f.angle_deg == pytest.approx(-26.57, abs=2.0)


def test_tiny_lesion_gets_the_minimum_drawn_size():
    m = np.zeros((100, 100), bool)
    m[50, 50] = True
    p = CoarseParams(**{**vars(NO_JITTER), "min_semi_axis": 12.0})
    (e,) = simulate_coarse_ellipses(m, "MA", params=p)
    assert e.semi_axes == pytest.approx((12.0, 12.0))
    # the calibrated microaneurysm constants draw a hand-sized circle around a 1 px lesion
    (e,) = simulate_coarse_ellipses(m, "MA", seed=0)
    assert min(e.semi_axes) > 0.5 * DEFAULT_PARAMS["MA"].min_semi_axis


# -- clustering -------------------------------------------------------------------------------


def test_cluster_components_hits_the_requested_count_and_groups_neighbours():
    pts = np.array([[0, 0], [1, 0], [10, 0], [11, 0], [30, 0], [50, 0]], float)
    assert list(cluster_components(pts, 6)) == [0, 1, 2, 3, 4, 5]
    assert list(cluster_components(pts, 4)) == [0, 0, 1, 1, 2, 3]
    assert list(cluster_components(pts, 1)) == [0] * 6
    labels = cluster_components(pts, 3)  # the next shortest gaps are 9 (1 -> 10), then 19
    assert list(labels) == [0, 0, 0, 0, 1, 2]


# -- files and masks --------------------------------------------------------------------------


def test_simulate_coarse_file_covers_each_lesion_and_skips_od_unless_asked():
    ex = assorted_mask()
    ma = np.zeros_like(ex)
    ma[80, 80] = ma[20, 200] = True
    od = np.zeros_like(ex)
    disc(od, 80, 60, 15)
    masks = {"MA": ma, "EX": ex, "OD": od, "SE": np.zeros_like(ex)}
    f = simulate_coarse_file(masks, "IDRiD_99.jpg", seed=4)
    assert isinstance(f, EllipseFile) and f.image == "IDRiD_99.jpg"
    assert {e.lesion for e in f.ellipses} == {"EX", "MA"}
    assert sum(e.lesion == "MA" for e in f.ellipses) == 2
    assert len({e.id for e in f.ellipses}) == len(f.ellipses)
    for code in ("EX", "MA"):
        cm = coarse_mask(f.ellipses, ex.shape, code)
        assert not (masks[code] & ~cm).any()
    # the union of one lesion's ellipses only: EX ellipses are not in the MA coarse mask
    assert coarse_mask(f.ellipses, ex.shape, "MA").sum() < coarse_mask(f.ellipses, ex.shape, "EX").sum()
    with_od = simulate_coarse_file(masks, "IDRiD_99.jpg", seed=4, lesions=("EX", "MA", "OD"))
    assert sum(e.lesion == "OD" for e in with_od.ellipses) == 1
    # each lesion's ellipses do not depend on which other lesions were asked for
    assert as_dicts([e for e in with_od.ellipses if e.lesion != "OD"]) == as_dicts(f.ellipses)


def test_the_simulated_lesions_are_the_refined_lesions_of_the_lesion_table():
    # one definition: the simulator's default is lesions.REFINED_LESIONS, the disc left out
    assert SIMULATED_LESIONS is REFINED_LESIONS
    assert REFINED_LESIONS == ("MA", "SE", "EX", "HE")


def test_coarse_mask_is_the_union_of_that_lesions_ellipses():
    m, _ = pairs_mask()
    ellipses = simulate_coarse_ellipses(m, "SE", seed=0)
    union = np.zeros(m.shape, bool)
    for e in ellipses:
        union |= rasterize_ellipse(e, m.shape)
    assert np.array_equal(coarse_mask(ellipses, m.shape, "SE"), union)
    assert not coarse_mask(ellipses, m.shape, "EX").any()
