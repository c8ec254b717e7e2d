"""Who set each lesion pixel: the grader's hand or a model's proposal, one record for every model.

Every model that proposes pixels (a refined ellipse, a segmenter's tile, a microaneurysm
candidate) registers a `Proposal` with `PixelRecord.propose`: a lesion, a box in the image,
probabilities (or a mask) on that box and a description of who proposed it, e.g.
``{"kind": "model", "model": "refiner", "version": "1.2", "ellipse_id": "3fa1c2"}``.
The record keeps, per lesion, the mask that is shown and saved, the grader's own pixels and the
live proposals, and works only inside the box of the proposal or stroke at hand. Each call
returns the `PixelChange` boxes where a mask changed, so a viewer redraws only those.

Two views of a lesion: `masks[lesion]` is what is SHOWN (the grader's pixels and every pending
proposal's), `hand(lesion)` is what is CONFIRMED (painted, or accepted). The project folder's
mask files, overlay and lesion table hold the confirmed pixels only; the pending ones are
shown - hand and live only in this record (its table and per-proposal arrays), which brings
them back on reopen (`restore`).

The one overlap rule: a pixel is lesion while the grader's hand or at least one live proposal
claims it. A proposal claims the pixels of its box whose probability reaches its threshold (or
whose mask is set), except those the grader erased while it was live. Hence

* removing, moving (remove, then propose again) or re-thresholding a proposal changes only
  pixels that neither the grader nor another proposal claims: overlapping proposals keep
  theirs, hand-painted pixels are never taken away;
* a pixel the grader erased is not brought back by a re-threshold or by another proposal
  going away (a proposal made later, e.g. a newly drawn ellipse, may claim it);
* accepting a proposal makes the pixels it claims the grader's own.

`decide` accepts or rejects proposals one by one (a microaneurysm candidate under review) and
keeps a decision for each (lesion, model, centre, score) in the record's table, so the counts
of accepted and rejected candidates survive a reopen and a model run again can leave out
what the grader rejected.

Each proposal keeps its own probabilities on its own box (not one owner per pixel) because
both the overlap rule and a re-threshold have to re-derive what every proposal claims.
"""

from __future__ import annotations

from collections.abc import Iterable, Iterator
from dataclasses import dataclass, field

import numpy as np

Box = tuple[int, int, int, int]  # r0, r1, c0, c1 (half-open), in full-image pixels

# The form of the saved record (`table()["format"]`). 2: the mask files hold confirmed pixels
# only. 1 (and tables without a number): the mask files held the shown pixels, pending ones too.
RECORD_FORMAT = 2

__all__ = ["Box", "PixelChange", "PixelRecord", "Proposal", "RECORD_FORMAT", "RecordChanges", "dequantise", "quantise", "union_box"]


@dataclass(frozen=True)
class PixelChange:
    """The box of a lesion mask in which pixels changed (a viewer redraws only this)."""

    lesion: str
    box: Box

    @property
    def slices(self) -> tuple[slice, slice]:
        r0, r1, c0, c1 = self.box
        return slice(r0, r1), slice(c0, c1)


@dataclass
class Proposal:
    """What one model proposes for one lesion, on one box of the image."""

    id: int
    lesion: str
    box: Box
    description: dict
    prob: np.ndarray | None = None  # float32 box-sized, or None for a proposal given as a mask
    fixed: np.ndarray | None = None  # bool box-sized, for a proposal given as a mask
    threshold: float = 0.5
    erased: np.ndarray = field(default=None)  # bool box-sized: the grader erased these while it was live

    def __post_init__(self) -> None:
        if self.erased is None:
            self.erased = np.zeros(self.shape, bool)

    @property
    def shape(self) -> tuple[int, int]:
        r0, r1, c0, c1 = self.box
        return r1 - r0, c1 - c0

    @property
    def slices(self) -> tuple[slice, slice]:
        r0, r1, c0, c1 = self.box
        return slice(r0, r1), slice(c0, c1)

    def proposed(self) -> np.ndarray:
        """The pixels of its box this proposal puts forward, before the grader's erasures."""
        if self.prob is not None:
            # probability 0 is "not proposed" whatever the threshold
            return (self.prob >= self.threshold) & (self.prob > 0)
        return self.fixed

    def claim(self) -> np.ndarray:
        """The pixels of its box this proposal holds now."""
        return self.proposed() & ~self.erased

    def matches(self, criteria: dict) -> bool:
        return all(self.description.get(k) == v for k, v in criteria.items())


@dataclass
class RecordChanges:
    """What changed since the last save: masks, proposal files, the proposal table."""

    lesions: set[str] = field(default_factory=set)  # shown or confirmed pixels changed: rewrite their files
    proposals: set[int] = field(default_factory=set)  # proposals whose per-pixel data changed
    removed: set[int] = field(default_factory=set)  # proposals gone (their files go too)
    table: bool = False

    def __bool__(self) -> bool:
        return bool(self.lesions or self.proposals or self.removed or self.table)

    def update(self, other: "RecordChanges") -> None:
        self.lesions |= other.lesions
        self.proposals |= other.proposals
        self.removed |= other.removed
        self.table = self.table or other.table


def quantise(prob: np.ndarray, threshold: float | None = None) -> np.ndarray:
    """Probabilities as uint16 (what is saved); `dequantise` gives them back within 1/131070.

    With `threshold`, a value that would land on the other side of it is moved by one step,
    so the pixels claimed at that threshold are exactly the same after a reopen.
    """
    q = np.round(np.clip(prob.astype(np.float64), 0.0, 1.0) * 65535.0).astype(np.uint16)
    if threshold is not None:
        above = prob >= threshold
        back = dequantise(q) >= threshold
        q[above & ~back] += 1
        q[~above & back & (q > 0)] -= 1
    q[(prob > 0) & (q == 0)] = 1  # proposed stays proposed
    return q


def dequantise(q: np.ndarray) -> np.ndarray:
    q = np.asarray(q)
    if q.dtype.kind == "f":
        return q.astype(np.float32)
    return (q.astype(np.float64) / 65535.0).astype(np.float32)


def _intersect(a: Box, b: Box) -> Box | None:
    r0, r1 = max(a[0], b[0]), min(a[1], b[1])
    c0, c1 = max(a[2], b[2]), min(a[3], b[3])
    return (r0, r1, c0, c1) if r0 < r1 and c0 < c1 else None


def _local(inner: Box, outer: Box) -> tuple[slice, slice]:
    """Slices of `inner` in the coordinates of `outer`'s box."""
    return slice(inner[0] - outer[0], inner[1] - outer[0]), slice(inner[2] - outer[2], inner[3] - outer[2])


def union_box(boxes: Iterable[Box]) -> Box | None:
    boxes = list(boxes)
    if not boxes:
        return None
    return (min(b[0] for b in boxes), max(b[1] for b in boxes), min(b[2] for b in boxes), max(b[3] for b in boxes))


def _tight(diff: np.ndarray, box: Box) -> Box | None:
    """The bounding box (full-image coordinates) of the True pixels of `diff`, a `box`-sized array."""
    rows = np.flatnonzero(diff.any(axis=1))
    if rows.size == 0:
        return None
    cols = np.flatnonzero(diff.any(axis=0))
    return (box[0] + int(rows[0]), box[0] + int(rows[-1]) + 1, box[2] + int(cols[0]), box[2] + int(cols[-1]) + 1)


class PixelRecord:
    """The masks of one image and who set their pixels (see the module docstring for the rules).

    `masks` (lesion -> bool (H, W)) is shared with the annotation that owns the record and
    changes only through these methods; a lesion that never had a proposal needs no other
    per-pixel state (all its pixels are the grader's).
    """

    def __init__(self, masks: dict[str, np.ndarray]):
        self.masks = masks
        self.proposals: dict[int, Proposal] = {}
        self.next_id = 1
        self._hand: dict[str, np.ndarray] = {}  # lesion -> bool (H, W), from a lesion's first proposal on
        self._changes = RecordChanges()
        # the grader's verdicts on single proposals: {"lesion", "model", "decision", "centre", "box", "score"}
        self.decisions: list[dict] = []

    # --- looking things up -------------------------------------------------------------------
    def shape(self, lesion: str) -> tuple[int, int]:
        return self.masks[lesion].shape

    def find(self, **criteria) -> list[Proposal]:
        """Live proposals whose description has these values, e.g. ``find(ellipse_id="3fa1c2")``."""
        return [p for p in self.proposals.values() if p.matches(criteria)]

    def of_lesion(self, lesion: str) -> list[Proposal]:
        return [p for p in self.proposals.values() if p.lesion == lesion]

    def hand(self, lesion: str) -> np.ndarray:
        """The grader's own pixels of a lesion (a copy of the mask where no proposal was ever made)."""
        return self._hand[lesion] if lesion in self._hand else self.masks[lesion].copy()

    def hand_region(self, lesion: str, box: Box) -> np.ndarray:
        """The grader's own pixels of a lesion inside `box`: a view, no whole-image copy (redrawing
        one box must not copy 12 megapixels)."""
        r0, r1, c0, c1 = box
        return (self._hand[lesion] if lesion in self._hand else self.masks[lesion])[r0:r1, c0:c1]

    def _hand_array(self, lesion: str) -> np.ndarray:
        if lesion not in self._hand:
            # before a lesion's first proposal every pixel of it is the grader's
            self._hand[lesion] = self.masks[lesion].copy()
        return self._hand[lesion]

    def _overlapping(self, lesion: str, box: Box, exclude: int | None = None) -> Iterator[tuple[Proposal, Box]]:
        for p in self.proposals.values():
            if p.lesion == lesion and p.id != exclude:
                inter = _intersect(p.box, box)
                if inter is not None:
                    yield p, inter

    def _clip(self, lesion: str, box: Box) -> Box:
        h, w = self.shape(lesion)
        r0, r1, c0, c1 = (int(v) for v in box)
        return max(r0, 0), min(r1, h), max(c0, 0), min(c1, w)

    # --- what a model does ------------------------------------------------------------------
    def propose(
        self,
        lesion: str,
        box: Box,
        *,
        prob: np.ndarray | None = None,
        mask: np.ndarray | None = None,
        threshold: float = 0.5,
        description: dict | None = None,
        erased: np.ndarray | None = None,
    ) -> tuple[Proposal, PixelChange | None]:
        """Register a proposal (probabilities or a mask on `box`) and add the pixels it claims.

        `erased` (bool, the shape of the box) are pixels the grader already rejected: a model
        run again over the same place keeps them rejected.
        """
        if lesion not in self.masks:
            raise ValueError(f"unknown lesion {lesion!r}")
        if (prob is None) == (mask is None):
            raise ValueError("a proposal has either probabilities or a mask")
        data = np.asarray(prob if prob is not None else mask)
        full = tuple(int(v) for v in box)
        if data.shape != (full[1] - full[0], full[3] - full[2]):
            raise ValueError(f"proposal data of shape {data.shape} does not fit the box {box}")
        clipped = self._clip(lesion, full)
        if clipped[0] >= clipped[1] or clipped[2] >= clipped[3]:
            clipped = (clipped[0], clipped[0], clipped[2], clipped[2])  # wholly outside the image
            data = data[:0, :0]
        else:
            data = data[_local(clipped, full)]
            if erased is not None:
                erased = np.asarray(erased, bool)[_local(clipped, full)]
            # a model's box has margins where it proposes nothing (probability 0): keep only the rest
            inner = _tight(data != 0, clipped)
            if inner is not None:
                data = data[_local(inner, clipped)]
                if erased is not None:
                    erased = erased[_local(inner, clipped)]
                clipped = inner
        p = Proposal(
            id=self.next_id,
            lesion=lesion,
            box=clipped,
            description=dict(description or {}),
            prob=np.ascontiguousarray(data, np.float32) if prob is not None else None,
            fixed=np.ascontiguousarray(data, bool) if mask is not None else None,
            threshold=float(threshold),
            erased=None if erased is None or erased.shape != data.shape else np.array(erased, bool),
        )
        self.next_id += 1
        self._hand_array(lesion)  # what is there now stays the grader's
        self.proposals[p.id] = p
        self._changes.table = True
        self._changes.proposals.add(p.id)
        region = self.masks[lesion][p.slices]
        new = p.claim() & ~region
        region |= new
        return p, self._changed(lesion, new, p.box)

    def withdraw(self, proposal_id: int) -> PixelChange | None:
        """Remove a proposal: its pixels go unless the grader or another proposal claims them."""
        p = self.proposals.pop(proposal_id, None)
        if p is None:
            return None
        self._forget(p)
        return self._rederive(p.lesion, p.box)

    def withdraw_where(self, **criteria) -> list[PixelChange]:
        """Remove every proposal whose description matches (e.g. all of one ellipse)."""
        out = [self.withdraw(p.id) for p in self.find(**criteria)]
        return [c for c in out if c is not None]

    def set_threshold(self, threshold: float, ids: Iterable[int] | None = None, **criteria) -> list[PixelChange]:
        """Re-threshold proposals with probabilities (`ids`, or those matching `criteria`)."""
        chosen = [self.proposals[i] for i in ids if i in self.proposals] if ids is not None else self.find(**criteria)
        out = []
        for p in chosen:
            if p.prob is None or p.threshold == float(threshold):
                continue
            p.threshold = float(threshold)
            self._changes.table = True
            self._changes.proposals.add(p.id)  # its saved probabilities are quantised around the threshold
            change = self._rederive(p.lesion, p.box)
            if change is not None:
                out.append(change)
        return out

    def accept(self, ids: Iterable[int] | None = None, lesion: str | None = None) -> int:
        """Make proposals (`ids`, or all of `lesion`) the grader's own pixels; returns how many pixels."""
        chosen = [self.proposals[i] for i in ids if i in self.proposals] if ids is not None else self.of_lesion(lesion)
        n = 0
        for p in chosen:
            claim = p.claim()
            hand = self._hand_array(p.lesion)[p.slices]
            gained = int((claim & ~hand).sum())
            n += gained
            hand |= claim
            if gained:
                self._changes.lesions.add(p.lesion)  # shown unchanged, but the confirmed mask (its file) grew
            del self.proposals[p.id]
            self._forget(p)
            for other, _ in self._overlapping(p.lesion, p.box):
                self._changes.proposals.add(other.id)  # their files hold the hand pixels of their box
        return n

    def decide(self, proposal_id: int, decision: str) -> PixelChange | None:
        """The grader accepts ("accepted") or rejects ("rejected") one proposal; the verdict is kept.

        Accepting makes its pixels the grader's (as `accept`); rejecting withdraws it. Either way a
        decision entry remembers where it was (its `centre`: the description's, else its most
        probable pixel), so a rerun of the model can leave a rejected candidate out.
        """
        if decision not in ("accepted", "rejected"):
            raise ValueError(f"decision must be 'accepted' or 'rejected', not {decision!r}")
        p = self.proposals.get(proposal_id)
        if p is None:
            return None
        centre = p.description.get("centre")
        if centre is None:
            data = p.prob if p.prob is not None else p.fixed.astype(np.float32)
            r, c = np.unravel_index(int(np.argmax(data)), data.shape) if data.size else (0, 0)
            centre = [p.box[0] + int(r), p.box[2] + int(c)]
        score = p.description.get("score", float(p.prob.max()) if p.prob is not None and p.prob.size else None)
        self.decisions.append({"lesion": p.lesion, "model": p.description.get("model"), "decision": decision,
                               "centre": [int(centre[0]), int(centre[1])], "box": list(p.box), "score": score})
        self._changes.table = True
        if decision == "accepted":
            self.accept(ids=[proposal_id])
            # nothing shown changes, but its pixels are now the grader's: their box is redrawn as such
            return PixelChange(p.lesion, p.box)
        return self.withdraw(proposal_id)

    def decided(self, lesion: str, decision: str | None = None, model: str | None = None) -> list[dict]:
        """The decisions on `lesion` (of one kind, of one model's proposals)."""
        return [d for d in self.decisions if d["lesion"] == lesion and (decision is None or d["decision"] == decision)
                and (model is None or d.get("model") == model)]

    # --- what the grader does -----------------------------------------------------------------
    def hand_edit(
        self, lesion: str, box: Box, painted: np.ndarray | None = None, erased: np.ndarray | None = None
    ) -> PixelChange | None:
        """The grader painted (`painted`) or erased (`erased`) pixels of `box` (bool, box-sized).

        Painted pixels become the grader's; erased ones belong to no one and stay off for every
        proposal live now, whatever its threshold.
        """
        box = tuple(int(v) for v in box)
        clipped = self._clip(lesion, box)
        if clipped[0] >= clipped[1] or clipped[2] >= clipped[3]:
            return None
        loc = _local(clipped, box)
        painted = None if painted is None else np.asarray(painted, bool)[loc]
        erased = None if erased is None else np.asarray(erased, bool)[loc]
        box = clipped
        r0, r1, c0, c1 = box
        region = self.masks[lesion][r0:r1, c0:c1]
        before = region.copy()
        hand = self._hand.get(lesion)
        confirmed = None  # pending pixels painted over: shown before and after, but now the grader's
        if painted is not None:
            region[painted] = True
            if hand is not None:
                hand_region = hand[r0:r1, c0:c1]
                confirmed = painted & ~hand_region & before
                hand_region[painted] = True
        if erased is not None:
            region[erased] = False
            if hand is not None:
                hand[r0:r1, c0:c1][erased] = False
            for p, inter in self._overlapping(lesion, box):
                gone = erased[_local(inter, box)]
                if gone.any():
                    p.erased[_local(inter, p.box)] |= gone
        for p, _ in self._overlapping(lesion, box):
            self._changes.proposals.add(p.id)  # erasures and hand pixels of its box are saved with it
        diff = region != before
        if confirmed is not None:
            diff |= confirmed  # the box to save, and to redraw in the confirmed colour
        return self._changed(lesion, diff, box)

    def hand_release(self, lesion: str, box: Box, pixels: np.ndarray) -> PixelChange | None:
        """`pixels` of `box` (bool, box-sized) are no longer the grader's (undo of a stroke that had
        confirmed pending pixels): they stay shown where a live proposal still claims them."""
        hand = self._hand.get(lesion)
        if hand is None:
            return None  # no proposal was ever made: every pixel shown is the grader's
        r0, r1, c0, c1 = (int(v) for v in box)
        pixels = np.asarray(pixels, bool)
        region = hand[r0:r1, c0:c1]
        released = region & pixels
        if not released.any():
            return None
        region[released] = False
        for p, _ in self._overlapping(lesion, (r0, r1, c0, c1)):
            self._changes.proposals.add(p.id)
        change = self._rederive(lesion, (r0, r1, c0, c1))
        self._changes.lesions.add(lesion)
        return change or PixelChange(lesion, (r0, r1, c0, c1))

    def hand_set(self, lesion: str, box: Box, now: np.ndarray) -> PixelChange | None:
        """The pixels of `box` are now `now` by the grader's doing (undo, redo, an outside edit)."""
        r0, r1, c0, c1 = box
        now = np.asarray(now, bool)
        cur = self.masks[lesion][r0:r1, c0:c1]
        return self.hand_edit(lesion, box, painted=now & ~cur, erased=cur & ~now)

    # --- bookkeeping -------------------------------------------------------------------------
    def _forget(self, p: Proposal) -> None:
        self._changes.table = True
        self._changes.proposals.discard(p.id)
        self._changes.removed.add(p.id)

    def _rederive(self, lesion: str, box: Box) -> PixelChange | None:
        """Set the mask in `box` to what the rule says: hand pixels or anything a proposal claims."""
        r0, r1, c0, c1 = box
        if r0 >= r1 or c0 >= c1:
            return None
        want = self._hand_array(lesion)[r0:r1, c0:c1].copy()
        for p, inter in self._overlapping(lesion, box):
            want[_local(inter, box)] |= p.claim()[_local(inter, p.box)]
        region = self.masks[lesion][r0:r1, c0:c1]
        diff = want != region
        region[...] = want
        return self._changed(lesion, diff, box)

    def _changed(self, lesion: str, diff: np.ndarray, box: Box) -> PixelChange | None:
        tight = _tight(diff, box)
        if tight is None:
            return None
        self._changes.lesions.add(lesion)
        return PixelChange(lesion, tight)

    def mark_changed(self, lesion: str) -> None:
        """A lesion's mask changed outside these methods (e.g. replaced wholesale): save it."""
        self._changes.lesions.add(lesion)

    def has_changes(self) -> bool:
        return bool(self._changes)

    def take_changes(self) -> RecordChanges:
        """What changed since the last call (a save takes it; a failed save gives it back)."""
        out, self._changes = self._changes, RecordChanges()
        return out

    def give_back(self, changes: RecordChanges) -> None:
        """A save failed: what it took is unsaved again."""
        changes = RecordChanges(set(changes.lesions), set(changes.proposals), set(changes.removed), changes.table)
        changes.proposals -= changes.removed
        self._changes.update(changes)

    def check(self, lesion: str) -> bool:
        """The rule holds on the whole lesion (tests; whole-image work, never per event)."""
        want = self.hand(lesion).copy()
        for p in self.of_lesion(lesion):
            want[p.slices] |= p.claim()
        return bool(np.array_equal(want, self.masks[lesion]))

    # --- saving and restoring ------------------------------------------------------------------
    def table(self) -> dict:
        """The proposal table as JSON-ready data (the per-pixel arrays are saved apart)."""
        return {
            "format": RECORD_FORMAT,
            "next_id": self.next_id,
            "proposals": [
                {
                    "id": p.id,
                    "lesion": p.lesion,
                    "box": list(p.box),
                    "threshold": p.threshold,
                    "kind": "probability" if p.prob is not None else "mask",
                    "description": p.description,
                }
                for p in sorted(self.proposals.values(), key=lambda q: q.id)
            ],
            "decisions": [dict(d) for d in self.decisions],
        }

    def arrays(self, proposal_id: int) -> dict[str, np.ndarray]:
        """A proposal's per-pixel data, copied where it can still change (for a background save)."""
        p = self.proposals[proposal_id]
        out = {"erased": p.erased.copy()}
        if p.prob is not None:
            # 16-bit steps of 1/65535: compact to save, and no threshold step of the slider falls between
            out["prob"] = quantise(p.prob, p.threshold)
        else:
            out["mask"] = p.fixed
        if p.lesion in self._hand:
            out["hand"] = self._hand[p.lesion][p.slices].copy()
        return out

    def restore(self, table: dict, arrays: dict[int, dict[str, np.ndarray]]) -> set[str]:
        """Rebuild the proposals saved by `table` / `arrays` into the masks already loaded.

        The rule follows the table's "format" (`RECORD_FORMAT`):

        * 2: the masks loaded are the CONFIRMED pixels (the mask files). A proposal's pending
          pixels (those it claims that its saved `hand` does not) are taken out of them, so
          masks that still hold shown pixels (a layer, a file a killed migration had not
          rewritten yet) read the same; then every live claim is shown again. Returns the
          lesions whose masks held such pending pixels (their files want rewriting).
        * 1 or none (and the older sources.json form): the masks loaded are the SHOWN pixels and
          the truth: a pixel a proposal puts forward but the mask lacks was erased (here or
          outside napari); a mask pixel no proposal claims is the grader's. Returns no lesion.
        """
        current = int(table.get("format", 1) or 1) >= 2
        saved_hand: dict[str, list[tuple[Proposal, np.ndarray]]] = {}
        for entry in table.get("proposals", []):
            pid, lesion = int(entry["id"]), str(entry["lesion"])
            if lesion not in self.masks or pid not in arrays:
                continue
            data = arrays[pid]
            box = tuple(int(v) for v in entry["box"])
            if self._clip(lesion, box) != box:
                continue  # a box outside this image: not this image's record
            shape = (box[1] - box[0], box[3] - box[2])
            prob, fixed, erased = data.get("prob"), data.get("mask"), data.get("erased")
            given = prob if prob is not None else fixed
            if given is None or given.shape != shape:
                continue
            p = Proposal(
                id=pid,
                lesion=lesion,
                box=box,
                # an older folder's model "folder" stays behind (project files hold no path)
                description={k: v for k, v in dict(entry.get("description", {})).items() if k != "folder"},
                prob=None if prob is None else dequantise(prob),
                fixed=None if prob is not None else np.asarray(fixed, bool),
                threshold=float(entry.get("threshold", 0.5)),
            )
            if erased is not None and erased.shape == shape:
                p.erased |= np.asarray(erased, bool)
            if not current:
                p.erased |= p.proposed() & ~self.masks[lesion][p.slices]
            self.proposals[pid] = p
            hand = data.get("hand")
            saved_hand.setdefault(lesion, []).append(
                (p, np.asarray(hand, bool) if hand is not None and hand.shape == shape else None))
        self.next_id = max([int(table.get("next_id", 1)), *(pid + 1 for pid in self.proposals)])
        self.decisions = [dict(d) for d in table.get("decisions", []) if isinstance(d, dict)
                          and d.get("lesion") in self.masks and len(d.get("centre", ())) == 2]
        stale: set[str] = set()
        for lesion in {p.lesion for p in self.proposals.values()}:
            mask = self.masks[lesion]
            if current:
                pending = np.zeros(mask.shape, bool)
                claimed = np.zeros(mask.shape, bool)
                for p, bits in saved_hand.get(lesion, []):
                    claim = p.claim()
                    claimed[p.slices] |= claim
                    pending[p.slices] |= claim if bits is None else claim & ~bits
                if (mask & pending).any():
                    stale.add(lesion)
                hand = mask & ~pending
                mask[...] = hand | claimed  # in place: the annotation shares these arrays
                self._hand[lesion] = hand
            else:
                claimed = np.zeros(mask.shape, bool)
                for p in self.of_lesion(lesion):
                    claimed[p.slices] |= p.claim()
                hand = mask & ~claimed
                for p, bits in saved_hand.get(lesion, []):
                    if bits is not None:
                        hand[p.slices] |= bits & mask[p.slices]
                self._hand[lesion] = hand
        return stale
