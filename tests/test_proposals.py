"""The one record of who set each pixel: proposals, hand edits, the overlap rule, save and reopen."""

import numpy as np
import pytest

from napari_retina.io.ellipses import Ellipse, ellipse_bbox, rasterize_ellipse
from napari_retina.lesions import LESION_CODES
from napari_retina.proposals import PixelRecord

H, W = 60, 80


def _record():
    return PixelRecord({c: np.zeros((H, W), bool) for c in LESION_CODES})


def _ellipse_prob(e: Ellipse):
    """Box and probabilities as the refiner gives them: highest at the centre, zero outside the ellipse."""
    r0, r1, c0, c1 = ellipse_bbox(e, shape=(H, W))
    inside = rasterize_ellipse(e, (H, W))[r0:r1, c0:c1]
    rr, cc = np.mgrid[r0:r1, c0:c1]
    a = max(e.semi_axes)
    d = np.hypot(rr - e.center_xy[1], cc - e.center_xy[0]) / a
    return (r0, r1, c0, c1), np.where(inside, 1.0 - d, 0.0).astype(np.float32)


def _propose(rec, e, threshold=0.5, eid="e"):
    box, prob = _ellipse_prob(e)
    return rec.propose(e.lesion, box, prob=prob, threshold=threshold, description={"kind": "model", "ellipse_id": eid})


def _full(box, local, shape=(H, W)):
    out = np.zeros(shape, bool)
    r0, r1, c0, c1 = box
    out[r0:r1, c0:c1] = local
    return out


def test_ellipse_proposal_adds_its_pixels_and_delete_takes_only_those():
    rec = _record()
    e = Ellipse("EX", (30.0, 25.0), (12.0, 8.0), 20.0)
    hand = np.zeros((H, W), bool)
    hand[24:27, 10:50] = True  # a stroke across the ellipse, painted first
    rec.hand_edit("EX", (0, H, 0, W), painted=hand)
    p, change = _propose(rec, e, eid="a")
    claim = _full(p.box, p.claim())
    assert claim.any() and not (claim & ~rasterize_ellipse(e, (H, W))).any()
    np.testing.assert_array_equal(rec.masks["EX"], hand | claim)
    # the change box is the tight box of what changed, inside the proposal's box
    changed = claim & ~hand
    rows, cols = np.nonzero(changed)
    assert change.box == (rows.min(), rows.max() + 1, cols.min(), cols.max() + 1)
    assert rec.find(ellipse_id="a") == [p]

    [gone] = rec.withdraw_where(ellipse_id="a")
    np.testing.assert_array_equal(rec.masks["EX"], hand)  # the stroke survives, also inside the ellipse
    assert gone.box == change.box
    assert rec.proposals == {}


def test_moving_an_ellipse_is_withdraw_then_propose():
    rec = _record()
    p, _ = _propose(rec, Ellipse("HE", (20.0, 20.0), (8.0, 6.0), 0.0), eid="m")
    rec.withdraw(p.id)
    moved = Ellipse("HE", (55.0, 35.0), (8.0, 6.0), 0.0)
    q, _ = _propose(rec, moved, eid="m")
    np.testing.assert_array_equal(rec.masks["HE"], _full(q.box, q.claim()))
    assert not rec.masks["HE"][10:30, 10:30].any()


def test_rethreshold_never_touches_hand_or_erased_pixels():
    rec = _record()
    e = Ellipse("SE", (40.0, 30.0), (15.0, 12.0), 0.0)
    p, _ = _propose(rec, e, threshold=0.5)
    box = p.box
    n_mid = rec.masks["SE"].sum()
    # the grader paints a pixel the proposal does not claim, and erases one it does
    r, c = 30, 40  # the centre: claimed at every threshold
    erase = np.zeros((H, W), bool)
    erase[r, c] = True
    rec.hand_edit("SE", (0, H, 0, W), erased=erase)
    paint = np.zeros((H, W), bool)
    paint[30, 53] = True  # inside the box, probability below 0.5
    assert not rec.masks["SE"][30, 53]
    rec.hand_edit("SE", (0, H, 0, W), painted=paint)

    changes = rec.set_threshold(0.9, ids=[p.id])
    assert rec.masks["SE"].sum() < n_mid and rec.masks["SE"][30, 53] and not rec.masks["SE"][r, c]
    assert all(box[0] <= ch.box[0] and ch.box[1] <= box[1] and box[2] <= ch.box[2] and ch.box[3] <= box[3] for ch in changes)
    rec.set_threshold(0.05, ids=[p.id])
    assert rec.masks["SE"].sum() > n_mid
    assert not rec.masks["SE"][r, c], "an erased pixel came back with a lower threshold"
    assert rec.masks["SE"][30, 53]
    assert rec.check("SE")


def test_accept_makes_proposals_hand_pixels():
    rec = _record()
    p, _ = _propose(rec, Ellipse("MA", (20.0, 20.0), (6.0, 5.0), 0.0), eid="k")
    before = rec.masks["MA"].copy()
    assert rec.accept(lesion="MA") == before.sum()
    assert rec.proposals == {}
    assert rec.withdraw_where(ellipse_id="k") == []
    assert rec.set_threshold(0.99) == []
    np.testing.assert_array_equal(rec.masks["MA"], before)
    np.testing.assert_array_equal(rec.hand("MA"), before)


def test_overlapping_proposals_of_one_lesion_keep_each_others_pixels():
    rec = _record()
    a, _ = _propose(rec, Ellipse("EX", (30.0, 30.0), (14.0, 9.0), 0.0), eid="a")
    b, _ = _propose(rec, Ellipse("EX", (42.0, 30.0), (14.0, 9.0), 0.0), eid="b")
    claim_a, claim_b = _full(a.box, a.claim()), _full(b.box, b.claim())
    assert (claim_a & claim_b).any()
    np.testing.assert_array_equal(rec.masks["EX"], claim_a | claim_b)
    # a stricter threshold on one gives back only what the other does not claim
    rec.set_threshold(0.95, ids=[a.id])
    np.testing.assert_array_equal(rec.masks["EX"], _full(a.box, a.claim()) | claim_b)
    rec.set_threshold(0.5, ids=[a.id])
    rec.withdraw(a.id)
    np.testing.assert_array_equal(rec.masks["EX"], claim_b)
    rec.withdraw(b.id)
    assert not rec.masks["EX"].any()


def test_overlapping_proposals_of_two_lesions_are_independent():
    rec = _record()
    ex, _ = _propose(rec, Ellipse("EX", (30.0, 30.0), (14.0, 9.0), 0.0), eid="ex")
    he, _ = _propose(rec, Ellipse("HE", (36.0, 30.0), (14.0, 9.0), 0.0), eid="he")
    claim_ex, claim_he = _full(ex.box, ex.claim()), _full(he.box, he.claim())
    assert (claim_ex & claim_he).any()
    # an erasure in one lesion leaves the other lesion alone
    rec.hand_edit("EX", ex.box, erased=np.ones(ex.shape, bool))
    assert not rec.masks["EX"].any()
    np.testing.assert_array_equal(rec.masks["HE"], claim_he)
    rec.withdraw(he.id)
    assert not rec.masks["HE"].any()
    rec.set_threshold(0.1, ids=[ex.id])
    assert not rec.masks["EX"].any(), "erased pixels came back"


def test_erased_pixels_stay_off_when_an_overlapping_proposal_goes():
    rec = _record()
    a, _ = _propose(rec, Ellipse("EX", (30.0, 30.0), (14.0, 9.0), 0.0), eid="a")
    b, _ = _propose(rec, Ellipse("EX", (38.0, 30.0), (14.0, 9.0), 0.0), eid="b")
    both = _full(a.box, a.claim()) & _full(b.box, b.claim())
    rec.hand_edit("EX", (0, H, 0, W), erased=both)
    rec.withdraw(a.id)
    assert not (rec.masks["EX"] & both).any()
    np.testing.assert_array_equal(rec.masks["EX"], _full(b.box, b.claim()))


def test_a_mask_proposal_works_like_a_probability_one():
    rec = _record()
    tile = np.zeros((10, 10), bool)
    tile[2:5, 3:8] = True
    p, change = rec.propose("EX", (5, 15, 5, 15), mask=tile, description={"kind": "model", "model": "exudates", "tile": 3})
    assert change.box == (7, 10, 8, 13) and rec.masks["EX"].sum() == 15
    assert rec.set_threshold(0.9, model="exudates") == []  # masks have no threshold
    rec.withdraw(p.id)
    assert not rec.masks["EX"].any()


def test_a_proposal_reaching_past_the_image_is_clipped():
    rec = _record()
    p, change = rec.propose("OD", (-5, 5, W - 5, W + 5), mask=np.ones((10, 10), bool), description={})
    assert p.box == (0, 5, W - 5, W) and rec.masks["OD"].sum() == 25
    with pytest.raises(ValueError, match="does not fit"):
        rec.propose("OD", (0, 4, 0, 4), mask=np.ones((3, 3), bool))


def test_changes_name_only_what_was_edited():
    rec = _record()
    rec.take_changes()
    p, _ = _propose(rec, Ellipse("HE", (30.0, 30.0), (8.0, 6.0), 0.0))
    ch = rec.take_changes()
    assert ch.lesions == {"HE"} and ch.proposals == {p.id} and ch.table and not ch.removed
    assert not rec.has_changes()
    stroke = np.zeros((4, 4), bool)
    stroke[1, 1] = True
    rec.hand_edit("MA", (0, 4, 0, 4), painted=stroke)
    ch = rec.take_changes()
    assert ch.lesions == {"MA"} and not ch.proposals and not ch.table
    rec.withdraw(p.id)
    ch = rec.take_changes()
    assert ch.lesions == {"HE"} and ch.removed == {p.id} and ch.table
    rec.give_back(ch)  # a failed save: the same is unsaved again
    assert rec.take_changes().lesions == {"HE"}


def test_random_edits_follow_the_rule_computed_on_whole_images():
    """Any sequence of operations gives mask = hand | claims, computed here the slow way."""
    rng = np.random.default_rng(7)
    rec = _record()
    hand = np.zeros((H, W), bool)
    live = {}  # id -> (box, prob, threshold, erased full-size)
    for step in range(300):
        op = rng.choice(["propose", "withdraw", "threshold", "paint", "erase", "accept"])
        if op == "propose":
            e = Ellipse("EX", (float(rng.uniform(5, W - 5)), float(rng.uniform(5, H - 5))),
                        (float(rng.uniform(3, 15)), float(rng.uniform(3, 10))), float(rng.uniform(0, 180)))
            box, prob = _ellipse_prob(e)
            t = float(rng.uniform(0.1, 0.9))
            p, _ = rec.propose("EX", box, prob=prob, threshold=t)
            live[p.id] = [box, prob, t, np.zeros((H, W), bool)]
        elif op == "withdraw" and live:
            pid = int(rng.choice(list(live)))
            rec.withdraw(pid)
            del live[pid]
        elif op == "threshold" and live:
            pid = int(rng.choice(list(live)))
            t = float(rng.uniform(0.05, 0.95))
            rec.set_threshold(t, ids=[pid])
            live[pid][2] = t
        elif op in ("paint", "erase"):
            r0, c0 = int(rng.integers(0, H - 8)), int(rng.integers(0, W - 8))
            box = (r0, r0 + 8, c0, c0 + 8)
            px = rng.random((8, 8)) < 0.4
            full = _full(box, px)
            if op == "paint":
                rec.hand_edit("EX", box, painted=px)
                hand |= full
            else:
                full &= rec.masks["EX"]  # napari reports only pixels that change
                rec.hand_edit("EX", box, erased=full[box[0] : box[1], box[2] : box[3]])
                hand &= ~full
                for v in live.values():
                    v[3] |= full
        elif op == "accept" and live:
            pid = int(rng.choice(list(live)))
            box, prob, t, erased = live.pop(pid)
            hand |= _full(box, prob >= t) & ~erased
            rec.accept(ids=[pid])
        want = hand.copy()
        for box, prob, t, erased in live.values():
            want |= _full(box, prob >= t) & ~erased
        np.testing.assert_array_equal(rec.masks["EX"], want, err_msg=f"step {step}: {op}")


def test_saved_probabilities_claim_the_same_pixels_at_the_threshold_in_use():
    from napari_retina.proposals import dequantise, quantise

    rng = np.random.default_rng(3)
    prob = rng.random((50, 50)).astype(np.float32)
    prob[:5] = 0.0
    for t in (0.05, 0.3, 0.5, float(prob[10, 10]), 0.95):
        back = dequantise(quantise(prob, t))
        np.testing.assert_array_equal(back >= t, prob >= t)
        assert np.abs(back - prob).max() <= 1 / 65535 + 1e-7
        np.testing.assert_array_equal(back > 0, prob > 0)


def test_confirming_pending_pixels_is_a_change_of_the_saved_mask_though_nothing_shown_changes():
    rec = _record()
    p, _ = _propose(rec, Ellipse("MA", (20.0, 20.0), (6.0, 5.0), 0.0))
    rec.take_changes()
    shown = rec.masks["MA"].copy()
    stroke = np.zeros((H, W), bool)
    stroke[20, 18:22] = True
    assert shown[stroke].all()
    rec.hand_edit("MA", (0, H, 0, W), painted=stroke)  # painted over pending pixels
    ch = rec.take_changes()
    assert ch.lesions == {"MA"} and p.id in ch.proposals
    np.testing.assert_array_equal(rec.masks["MA"], shown)
    assert rec.accept(lesion="MA") == int(shown.sum()) - 4
    assert rec.take_changes().lesions == {"MA"}
    np.testing.assert_array_equal(rec.hand("MA"), shown)


def _random_record(seed):
    rng = np.random.default_rng(seed)
    rec = _record()
    for _ in range(120):
        op = rng.choice(["propose", "withdraw", "paint", "erase", "accept", "threshold"])
        live = list(rec.proposals)
        if op == "propose":
            e = Ellipse("EX", (float(rng.uniform(5, W - 5)), float(rng.uniform(5, H - 5))),
                        (float(rng.uniform(3, 12)), float(rng.uniform(3, 8))), float(rng.uniform(0, 180)))
            box, prob = _ellipse_prob(e)
            rec.propose("EX", box, prob=prob, threshold=float(rng.uniform(0.1, 0.9)))
        elif op == "withdraw" and live:
            rec.withdraw(int(rng.choice(live)))
        elif op == "threshold" and live:
            rec.set_threshold(float(rng.uniform(0.05, 0.95)), ids=[int(rng.choice(live))])
        elif op == "accept" and live:
            rec.accept(ids=[int(rng.choice(live))])
        elif op in ("paint", "erase"):
            r0, c0 = int(rng.integers(0, H - 8)), int(rng.integers(0, W - 8))
            px = rng.random((8, 8)) < 0.4
            if op == "paint":
                rec.hand_edit("EX", (r0, r0 + 8, c0, c0 + 8), painted=px)
            else:
                rec.hand_edit("EX", (r0, r0 + 8, c0, c0 + 8), erased=px & rec.masks["EX"][r0:r0 + 8, c0:c0 + 8])
    _propose(rec, Ellipse("EX", (40.0, 30.0), (9.0, 6.0), 20.0), threshold=0.3)  # pending at the end, whatever ran
    return rec


@pytest.mark.parametrize("seed", [1, 2, 3])
def test_the_saved_record_restores_from_the_confirmed_masks_and_from_the_shown_ones_alike(seed):
    """Format 2: the mask files hold confirmed pixels; a layer's shown pixels read the same."""
    rec = _random_record(seed)
    assert rec.proposals and (rec.masks["EX"] & ~rec.hand("EX")).any()  # some pixels are pending
    table = rec.table()
    assert table["format"] == 2
    arrays = {i: rec.arrays(i) for i in rec.proposals}
    for given in (rec.hand("EX"), rec.masks["EX"]):
        back = PixelRecord({c: np.zeros((H, W), bool) for c in LESION_CODES})
        back.masks["EX"] = given.copy()
        assert back.restore(table, arrays) == ({"EX"} if given is rec.masks["EX"] else set())
        np.testing.assert_array_equal(back.masks["EX"], rec.masks["EX"])
        np.testing.assert_array_equal(back.hand("EX"), rec.hand("EX"))
        assert {i: p.claim().tolist() for i, p in back.proposals.items()} == {
            i: p.claim().tolist() for i, p in rec.proposals.items()}
        assert back.check("EX")
    # a table of the older form is read by its own rule: the masks given are the shown pixels
    old = PixelRecord({c: np.zeros((H, W), bool) for c in LESION_CODES})
    old.masks["EX"] = rec.masks["EX"].copy()
    old.restore(dict(table, format=1), arrays)
    np.testing.assert_array_equal(old.masks["EX"], rec.masks["EX"])
    np.testing.assert_array_equal(old.hand("EX"), rec.hand("EX"))
