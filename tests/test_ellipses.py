"""The ellipse exchange format: JSON round trip, validation messages, rasterisation, napari corners."""

from __future__ import annotations

import json
import math

import numpy as np
import pytest

from napari_retina.io.ellipses import (
    Ellipse,
    EllipseFile,
    corners_to_ellipse,
    dumps_ellipses,
    ellipse_bbox,
    ellipse_to_corners,
    load_ellipses,
    new_id,
    normalize_angle_deg,
    parse_ellipses,
    rasterize_ellipse,
    rasterize_ellipses,
    save_ellipses,
)
from napari_retina.io.errors import RetinaInputError


def analytic_mask(x, y, a, b, t_deg, shape):
    """The definition, evaluated independently of the module: pixel (r, c) is centred at (x=c, y=r)."""
    rr, cc = np.mgrid[0 : shape[0], 0 : shape[1]].astype(float)
    t = math.radians(t_deg)
    dx, dy = cc - x, rr - y
    d = ((dx * math.cos(t) + dy * math.sin(t)) / a) ** 2 + ((-dx * math.sin(t) + dy * math.cos(t)) / b) ** 2
    return d <= 1 + 1e-9


# -- JSON ------------------------------------------------------------------------------------


def test_round_trip_keeps_optional_and_unknown_fields(tmp_path):
    doc = {
        "image": "IDRiD_55.jpg",
        "ellipses": [
            {
                "lesion": "ex",
                "center_xy": [10.5, 8],
                "semi_axes": [6, 2.25],
                "angle_deg": 30,
                "id": "abc123",
                "author": "grader1",
                "created": "2024-05-01T10:00:00+00:00",
                "confidence": {"score": 0.75, "tags": ["faint", "edge"]},
            },
            {"lesion": "MA", "center_xy": [1, 2], "semi_axes": [0.4, 0.4], "angle_deg": -12.5},
        ],
        "tool": {"name": "other-annotator", "version": 3},
        "notes": "re-graded",
    }
    p = tmp_path / "ellipses.json"
    p.write_text(json.dumps(doc))
    ef = load_ellipses(p)
    assert ef.image == "IDRiD_55.jpg"
    e0 = ef.ellipses[0]
    assert e0.lesion == "EX"  # upper-cased
    assert e0.center_xy == (10.5, 8.0) and e0.semi_axes == (6.0, 2.25) and e0.angle_deg == 30.0
    assert e0.id == "abc123"
    assert e0.extra["author"] == "grader1"
    assert ef.ellipses[1].id is None
    assert ef.extra == {"tool": {"name": "other-annotator", "version": 3}, "notes": "re-graded"}

    out = tmp_path / "sub.json"
    save_ellipses(out, ef)
    back = json.loads(out.read_text())
    expected = json.loads(json.dumps(doc))
    expected["ellipses"][0]["lesion"] = "EX"
    assert back == expected
    assert list(back["ellipses"][0])[:4] == ["lesion", "center_xy", "semi_axes", "angle_deg"]
    assert list(back)[:2] == ["image", "ellipses"]
    assert load_ellipses(out) == ef


def test_dumps_is_pretty_one_ellipse_per_line_and_exact():
    e = Ellipse("HE", (0.1 + 0.2, 1 / 3), (math.pi, 2.0), 45.0, {"id": new_id()})
    ef = EllipseFile("x.png", [e, Ellipse("OD", (5, 5), (50, 45), 0)], {"k": [1, 2]})
    text = dumps_ellipses(ef)
    lines = text.splitlines()
    assert lines[0] == "{" and lines[-1] == "}"
    assert sum('"lesion"' in line for line in lines) == 2 == len([l for l in lines if l.startswith("    {")])
    assert parse_ellipses(json.loads(text)) == ef  # floats survive exactly (repr)
    empty = EllipseFile("y.png")
    assert parse_ellipses(json.loads(dumps_ellipses(empty))) == empty


def test_new_id_is_unique_hex():
    ids = {new_id() for _ in range(200)}
    assert len(ids) == 200
    assert all(len(i) >= 8 and int(i, 16) >= 0 for i in ids)


def test_to_dict_key_order_and_values():
    e = Ellipse("se", [3, 4], [2, 1], 10, {"id": "q", "zzz": 1})
    assert list(e.to_dict().items()) == [
        ("lesion", "SE"),
        ("center_xy", [3.0, 4.0]),
        ("semi_axes", [2.0, 1.0]),
        ("angle_deg", 10.0),
        ("id", "q"),
        ("zzz", 1),
    ]


def test_invalid_json_names_file_line_and_column(tmp_path):
    p = tmp_path / "ellipses.json"
    p.write_text('{"image": "a.jpg",\n "ellipses": [}\n')
    with pytest.raises(RetinaInputError) as ei:
        load_ellipses(p)
    msg = str(ei.value)
    assert "ellipses.json" in msg and "not valid JSON" in msg and "line 2" in msg
    assert "\n" not in msg


def test_missing_file_is_a_retina_input_error(tmp_path):
    with pytest.raises(RetinaInputError, match="nothere.json"):
        load_ellipses(tmp_path / "nothere.json")


GOOD = {"lesion": "EX", "center_xy": [1, 2], "semi_axes": [3, 4], "angle_deg": 0}


@pytest.mark.parametrize(
    "bad, field",
    [
        ({k: v for k, v in GOOD.items() if k != "lesion"}, "lesion"),
        (dict(GOOD, lesion="XX"), "lesion"),
        (dict(GOOD, lesion=3), "lesion"),
        (dict(GOOD, semi_axes=[3, -1]), "semi_axes"),
        (dict(GOOD, semi_axes=[3, 0]), "semi_axes"),
        (dict(GOOD, semi_axes=[3]), "semi_axes"),
        (dict(GOOD, center_xy=[float("nan"), 2]), "center_xy"),
        (dict(GOOD, center_xy=["1", 2]), "center_xy"),
        (dict(GOOD, center_xy=[True, 2]), "center_xy"),
        (dict(GOOD, semi_axes=[float("inf"), 2]), "semi_axes"),
        (dict(GOOD, angle_deg=float("nan")), "angle_deg"),
        (dict(GOOD, angle_deg="30"), "angle_deg"),
        (dict(GOOD, score=float("nan")), "score"),
    ],
)
def test_malformed_ellipse_names_file_index_and_field(tmp_path, bad, field):
    p = tmp_path / "ellipses.json"
    # json.dumps writes NaN/Infinity, which Python's json (like many writers) accepts on reading
    p.write_text(json.dumps({"image": "a.jpg", "ellipses": [GOOD, GOOD, bad]}))
    with pytest.raises(RetinaInputError) as ei:
        load_ellipses(p)
    msg = str(ei.value)
    assert msg.startswith(str(p) + ": ellipse 2: "), msg
    assert field in msg and "\n" not in msg


@pytest.mark.parametrize(
    "doc, needle",
    [
        ({"image": "a.jpg", "ellipses": {"0": GOOD}}, "ellipses must be a list"),
        ({"image": "a.jpg"}, "ellipses is missing"),
        ({"ellipses": []}, "image is missing"),
        ({"image": 5, "ellipses": []}, "image"),
        ([GOOD], "expected a JSON object"),
        ({"image": "a.jpg", "ellipses": [GOOD, "EX"]}, "ellipse 1: expected a JSON object"),
        (
            {"image": "a.jpg", "ellipses": [dict(GOOD, id="u"), GOOD, dict(GOOD, id="u")]},
            "ellipse 2: id 'u' repeats ellipse 0",
        ),
    ],
)
def test_malformed_file_structure(doc, needle):
    with pytest.raises(RetinaInputError) as ei:
        parse_ellipses(doc, source="proj/ellipses.json")
    assert str(ei.value).startswith("proj/ellipses.json: ") and needle in str(ei.value)


def test_constructor_validates_too():
    with pytest.raises(ValueError, match="semi_axes"):
        Ellipse("EX", (0, 0), (-1, 1), 0)
    with pytest.raises(ValueError, match="lesion"):
        Ellipse("ZZ", (0, 0), (1, 1), 0)
    with pytest.raises(ValueError, match="lesion"):
        Ellipse("EX", (0, 0), (1, 1), 0, {"lesion": "HE"})  # extra may not shadow a core field


def test_normalize_angle():
    assert [normalize_angle_deg(t) for t in (0, 90, -90, 180, 270, -180, 135, -135, 450)] == [
        0, 90, 90, 0, 90, 0, -45, 45, 90
    ]


# -- rasterisation ---------------------------------------------------------------------------


def test_rotated_case_computed_by_hand():
    # centre (x=10, y=8), a=6, b=2, t=30 deg on a 20 x 24 image; cos30 = 0.8660, sin30 = 0.5;
    # u = dx cos t + dy sin t, v = -dx sin t + dy cos t, inside iff (u/6)^2 + (v/2)^2 <= 1
    e = Ellipse("EX", (10, 8), (6, 2), 30)
    m = rasterize_ellipse(e, (20, 24))
    assert m.shape == (20, 24) and m.dtype == bool
    # end of the major axis: x = 10 + 6 cos30 = 15.196, y = 8 + 6 sin30 = 11.
    # (r=11, c=15): dx=5, dy=3: u = 4.330 + 1.5 = 5.830, v = -2.5 + 2.598 = 0.098 -> 0.944 + 0.002 = 0.947 in
    assert m[11, 15]
    # (r=5, c=15): dx=5, dy=-3: u = 4.330 - 1.5 = 2.830, v = -2.5 - 2.598 = -5.098 -> 0.222 + 6.50 out
    # (a mirrored, i.e. counter-clockwise, rotation would put this pixel inside)
    assert not m[5, 15]
    # (r=5, c=5): the point-mirror of (11, 15) through the centre -> inside
    assert m[5, 5]
    # (r=8, c=16): dx=6, dy=0: u = 5.196, v = -3 -> 0.75 + 2.25 = 3.0 out (inside if it were axis-aligned)
    assert not m[8, 16]
    # (r=9, c=9): dx=-1, dy=1: u = -0.366, v = 1.366 -> 0.004 + 0.466 in
    assert m[9, 9]
    # (r=10, c=9): dx=-1, dy=2: u = 0.134, v = 2.232 -> 0.0005 + 1.245 out
    assert not m[10, 9]
    # (r=6, c=10): dx=0, dy=-2: u = -1, v = -1.732 -> 0.028 + 0.75 in
    assert m[6, 10]
    ref = analytic_mask(10, 8, 6, 2, 30, (20, 24))
    assert m.sum() == ref.sum()
    assert np.array_equal(m, ref)


def test_boundary_pixels_count_as_inside():
    # unit circle at (2, 2): the 4 neighbours lie exactly on the boundary -> a plus of 5 pixels
    m = rasterize_ellipse(Ellipse("MA", (2, 2), (1, 1), 0), (5, 5))
    assert m.sum() == 5 and m[1, 2] and m[3, 2] and m[2, 1] and m[2, 3]
    # centre (x=5, y=3), a=4, b=2, t=0: (r=3, c=9) and (r=1, c=5) are on the boundary, one further is out
    m = rasterize_ellipse(Ellipse("EX", (5, 3), (4, 2), 0), (8, 12))
    assert m[3, 9] and m[3, 1] and m[1, 5] and m[5, 5]
    assert not m[3, 10] and not m[0, 5] and not m[6, 5]
    # the same ellipse standing up (t=90, a along +y): (r=7, c=5) on the boundary despite cos(90) != 0 in floats
    m = rasterize_ellipse(Ellipse("EX", (5, 3), (4, 2), 90), (10, 12))
    assert m[7, 5] and not m[8, 5]


def test_matches_analytic_definition_on_random_ellipses():
    rng = np.random.default_rng(1)
    shape = (37, 45)
    for _ in range(200):
        x, y = rng.uniform(-5, 50), rng.uniform(-5, 42)
        a, b = rng.uniform(0.8, 20, 2)
        t = rng.uniform(-200, 200)
        m = rasterize_ellipse(Ellipse("HE", (x, y), (a, b), t), shape)
        ref = analytic_mask(x, y, a, b, t, shape)
        if ref.any():  # an empty definition falls back to the centre pixel, tested apart
            assert np.array_equal(m, ref), (x, y, a, b, t)


def test_angle_90_swaps_the_axes():
    shape = (30, 30)
    stand = rasterize_ellipse(Ellipse("EX", (14, 15), (9, 3), 90), shape)
    lying = rasterize_ellipse(Ellipse("EX", (14, 15), (9, 3), 0), shape)
    swapped = rasterize_ellipse(Ellipse("EX", (14, 15), (3, 9), 0), shape)
    assert np.array_equal(stand, swapped)
    assert not np.array_equal(stand, lying)
    # taller than wide: the column through the centre is longer than the row through it
    assert stand[:, 14].sum() == 19 and stand[15, :].sum() == 7
    # t and t + 180 are the same ellipse
    assert np.array_equal(
        rasterize_ellipse(Ellipse("EX", (14, 15), (9, 3), 20), shape),
        rasterize_ellipse(Ellipse("EX", (14, 15), (9, 3), 200), shape),
    )


def test_sub_pixel_ellipse_marks_its_centre_pixel():
    # no pixel centre is within 0.2 px of (3.4, 2.3), yet the pixel containing it (r=2, c=3) is kept
    m = rasterize_ellipse(Ellipse("MA", (3.4, 2.3), (0.2, 0.1), 10), (6, 6))
    assert m.sum() == 1 and m[2, 3]
    m = rasterize_ellipse(Ellipse("MA", (3.0, 2.0), (0.3, 0.3), 0), (6, 6))
    assert m.sum() == 1 and m[2, 3]
    # a sub-pixel ellipse outside the image marks nothing
    assert not rasterize_ellipse(Ellipse("MA", (-3, 2), (0.3, 0.3), 0), (6, 6)).any()


def test_partly_outside_is_clipped():
    shape = (20, 24)
    e = Ellipse("OD", (-2, 18), (8, 5), 20)  # centre left of the image, below half of it
    m = rasterize_ellipse(e, shape)
    ref = analytic_mask(-2, 18, 8, 5, 20, shape)
    assert m.shape == shape and m.any() and np.array_equal(m, ref)
    big = rasterize_ellipse(e, (60, 60))  # what lies outside must not wrap round to the far side
    assert not m[:, -5:].any() and not big[:, 30:].any()
    assert not rasterize_ellipse(Ellipse("OD", (100, 100), (5, 5), 0), shape).any()
    # an RGB image's shape works too
    assert rasterize_ellipse(e, (20, 24, 3)).shape == shape


def test_union_and_lesion_filter():
    ells = [
        Ellipse("EX", (4, 4), (2, 2), 0),
        Ellipse("HE", (15, 10), (3, 1.5), 45),
        Ellipse("EX", (5, 5), (2, 1), 0),
    ]
    shape = (20, 20)
    m_all = rasterize_ellipses(ells, shape)
    m_ex = rasterize_ellipses(ells, shape, lesion="ex")
    each = [rasterize_ellipse(e, shape) for e in ells]
    assert np.array_equal(m_all, each[0] | each[1] | each[2])
    assert np.array_equal(m_ex, each[0] | each[2])
    assert not rasterize_ellipses(ells, shape, lesion="MA").any()
    with pytest.raises(ValueError):
        rasterize_ellipses(ells, shape, lesion="QQ")


def test_bbox_by_hand_and_contains_mask():
    # angle 0, centre (x=5, y=3), a=4, b=2: columns 1..9, rows 1..5 -> (1, 6, 1, 10)
    e = Ellipse("EX", (5, 3), (4, 2), 0)
    assert ellipse_bbox(e) == (1, 6, 1, 10)
    assert ellipse_bbox(e, margin=2) == (-1, 8, -1, 12)
    assert ellipse_bbox(e, margin=2, shape=(7, 11)) == (0, 7, 0, 11)
    # rotated 90: half extents swap
    assert ellipse_bbox(Ellipse("EX", (5, 3), (4, 2), 90)) == (-1, 8, 3, 8)
    assert ellipse_bbox(Ellipse("EX", (100, 100), (2, 2), 0), shape=(10, 10)) in [(10, 10, 10, 10)]
    rng = np.random.default_rng(2)
    for _ in range(100):
        e = Ellipse("HE", tuple(rng.uniform(0, 40, 2)), tuple(rng.uniform(0.2, 12, 2)), rng.uniform(-180, 180))
        m = rasterize_ellipse(e, (40, 40))
        r0, r1, c0, c1 = ellipse_bbox(e, shape=(40, 40))
        rows, cols = np.nonzero(m)
        assert rows.min() >= r0 and rows.max() < r1 and cols.min() >= c0 and cols.max() < c1
        # tight: the unclipped box is the continuous ellipse's extent rounded inwards to pixel centres
        if min(e.semi_axes) >= 1:
            s = np.linspace(0, 2 * np.pi, 200001)
            t = math.radians(e.angle_deg)
            (a, b), (x, y) = e.semi_axes, e.center_xy
            bx = x + a * np.cos(s) * math.cos(t) - b * np.sin(s) * math.sin(t)
            by = y + a * np.cos(s) * math.sin(t) + b * np.sin(s) * math.cos(t)
            expected = (math.ceil(by.min()), math.floor(by.max()) + 1, math.ceil(bx.min()), math.floor(bx.max()) + 1)
            assert ellipse_bbox(e) == expected


# -- napari corners --------------------------------------------------------------------------


def test_corners_by_hand():
    # centre (x=5, y=3), a=4 along +x, b=2 along +y -> x in [1, 9], y in [1, 5]; (row, col) order
    c = ellipse_to_corners(Ellipse("EX", (5, 3), (4, 2), 0))
    assert c.shape == (4, 2)
    assert np.array_equal(c, np.array([[1.0, 1.0], [1.0, 9.0], [5.0, 9.0], [5.0, 1.0]]))
    # t=90: a runs along +y (rows); corner0 -> corner1 goes down the rows by 2a
    c = ellipse_to_corners(Ellipse("EX", (5, 3), (4, 2), 90))
    assert np.array_equal(c, np.array([[-1.0, 7.0], [7.0, 7.0], [7.0, 3.0], [-1.0, 3.0]]))


def test_corners_round_trip_random():
    rng = np.random.default_rng(3)
    for _ in range(300):
        e = Ellipse(
            "SE",
            tuple(rng.uniform(-50, 500, 2)),
            tuple(rng.uniform(0.3, 80, 2)),
            rng.uniform(-360, 360),
            {"id": new_id()},
        )
        back = corners_to_ellipse(ellipse_to_corners(e), "se", e.extra)
        assert back.lesion == "SE" and back.extra == e.extra
        assert back.center_xy == pytest.approx(e.center_xy, abs=1e-9)
        assert back.semi_axes == pytest.approx(e.semi_axes, rel=1e-12)
        assert -90 < back.angle_deg <= 90
        assert back.angle_deg == pytest.approx(normalize_angle_deg(e.angle_deg), abs=1e-9)
        assert np.allclose(ellipse_to_corners(back), ellipse_to_corners(e), atol=1e-9) or np.allclose(
            ellipse_to_corners(back), ellipse_to_corners(e)[[2, 3, 0, 1]], atol=1e-9
        )


def test_corners_in_napari_order_give_the_same_pixels():
    # napari's own box for an axis-aligned ellipse: (rmin,cmin), (rmax,cmin), (rmax,cmax), (rmin,cmax)
    corners = np.array([[1.0, 1.0], [5.0, 1.0], [5.0, 9.0], [1.0, 9.0]])
    e = corners_to_ellipse(corners, "EX")
    assert e.center_xy == (5.0, 3.0) and e.semi_axes == (2.0, 4.0) and e.angle_deg == 90.0
    assert np.array_equal(
        rasterize_ellipse(e, (8, 12)), rasterize_ellipse(Ellipse("EX", (5, 3), (4, 2), 0), (8, 12))
    )


def test_degenerate_corners_rejected():
    with pytest.raises(RetinaInputError):
        corners_to_ellipse(np.array([[1.0, 1.0], [1.0, 1.0], [1.0, 5.0], [1.0, 5.0]]), "EX")
    with pytest.raises(ValueError):
        corners_to_ellipse(np.zeros((3, 2)), "EX")
