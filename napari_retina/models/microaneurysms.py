"""Microaneurysm detection pieces shared by inference and training (headless, NumPy + OpenCV).

After Sarhan, Albarqouni, Yigitsoy, Navab and Eslami, "Multi-scale Microaneurysms Segmentation
Using Embedding Triplet Loss", MICCAI 2019 (Fig. 1):

1. `models.preprocess.subtract_local_background`: I_pre = 4 I - 4 G_sigma * I + c, per
   channel, inside the field of view (the HGNs' and the PRN's input).
2. Two hypothesis generation networks (HGN, `nets.segmentation.SegmentationNet`) map the
   enhanced image at full and at half scale; `fuse_maps` upsamples the half-scale map
   linearly and combines the two by arithmetic or geometric mean.
3. `refine_candidates`: the patch-wise refinement network (PRN,
   `nets.patch_classifier.PatchClassifier`) scores each connected candidate region of the
   fused map once, on the 129 x 129 patch centred on the region's most probable pixel, in
   batches; each candidate's pixels then combine their map value p with the region's PRN
   score s by the detector's `prn_rule` (`PRN_RULES`): "geometric", sqrt(p x s) (the
   paper's combination of map and classifier), or "rerank", t + (p - t) x s (t the candidate
   threshold: every candidate stays one, the PRN orders them). Pixels outside candidates are
   left as they are.

The paper runs the PRN in a sliding window over every pixel above 0.5, one pass per pixel:
a candidate of 20 pixels costs 20 passes there and one here, which is what makes it fit a
2-core CPU. The price: every pixel of a region shares one score, so the PRN cannot split a
region that holds a microaneurysm and a false one side by side.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Callable

import cv2
import numpy as np

from .preprocess import OFFSET, subtract_local_background

PATCH = 129  # the PRN's patch side (odd: one centre pixel)
# candidate regions the PRN scores per image at most (IDRiD's training images hold 47
# microaneurysms on average); more, and only the most probable are kept
MAX_CANDIDATES = 1000
# how a candidate pixel's map value p and its region's PRN score s combine (t: the candidate threshold)
PRN_RULES = {
    "geometric": lambda p, s, t: np.sqrt(p * s),  # the paper's: the PRN can push a candidate below t
    "rerank": lambda p, s, t: t + (p - t) * s,  # candidates stay above t, ordered by map and score
}
def fuse_maps(full: np.ndarray, half: np.ndarray, mode: str = "geometric") -> np.ndarray:
    """The two HGN maps as one full-size map: `half` (any smaller size) resized linearly, then the mean.

    "arithmetic": (a + b) / 2; "geometric": sqrt(a b) (a pixel needs both scales to agree).
    """
    full = np.asarray(full, np.float32)
    half = np.asarray(half, np.float32)
    if half.shape != full.shape:
        half = cv2.resize(half, (full.shape[1], full.shape[0]), interpolation=cv2.INTER_LINEAR)
    if mode == "arithmetic":
        return (full + half) * 0.5
    if mode == "geometric":
        return np.sqrt(np.clip(full, 0, None) * np.clip(half, 0, None))
    raise ValueError(f"fusion must be 'arithmetic' or 'geometric', not {mode!r}")


def shift_logits(prob: np.ndarray, offset: float) -> np.ndarray:
    """sigmoid(logit(p) - offset), computed as p / (p + (1 - p) e^offset): a monotone recalibration.

    The hypothesis networks learn with lesion pixels weighted by the background/lesion ratio,
    so their maps read as if half the pixels were lesions: most of a photograph's dark dots
    come out near 1. Shifting the logits (by the offset that puts the validation F1's best
    threshold of the fused map at 0.5) restores a usable range for the candidate threshold,
    the slider and the overlay; the order of pixels, hence AUPR, does not change.
    """
    p = np.asarray(prob, np.float32)
    if not offset:
        return p
    with np.errstate(divide="ignore", invalid="ignore"):
        out = p / (p + (1.0 - p) * np.float32(np.exp(offset)))
    return np.nan_to_num(out, nan=0.0).astype(np.float32)


@dataclass
class Candidates:
    """The connected candidate regions of a map (8-connectivity) and the pixel each is scored at."""

    labels: np.ndarray  # int32 (H, W): 0 background, 1..n regions
    centres: np.ndarray  # int (n, 2): (row, col) of each region's most probable pixel
    peaks: np.ndarray  # float32 (n,): the map's value there

    def __len__(self) -> int:
        return len(self.centres)


def candidate_regions(prob: np.ndarray, threshold: float = 0.5, fov: np.ndarray | None = None) -> Candidates:
    """Regions of `prob` >= `threshold` (inside `fov`), each with its most probable pixel."""
    from ..metrics import label_lesions

    prob = np.asarray(prob, np.float32)
    cand = prob >= threshold
    if fov is not None:
        cand &= np.asarray(fov, bool)
    labels, n = label_lesions(cand)
    if n == 0:
        return Candidates(labels.astype(np.int32), np.zeros((0, 2), int), np.zeros(0, np.float32))
    # each region's most probable pixel (the first in raster order on ties), found among the
    # candidate pixels only: ndimage.maximum_position sorts the whole 12-megapixel map (4 s)
    flat = np.flatnonzero(labels)
    lab, val = labels.ravel()[flat], prob.ravel()[flat]
    order = np.lexsort((flat, -val, lab))
    first = order[np.r_[True, lab[order][1:] != lab[order][:-1]]]
    centres = np.stack(np.unravel_index(flat[first], prob.shape), axis=1).astype(int).reshape(n, 2)
    return Candidates(labels.astype(np.int32), centres, prob[centres[:, 0], centres[:, 1]])


def patches_at(image: np.ndarray, centres: np.ndarray, size: int = PATCH) -> np.ndarray:
    """(n, size, size, C) patches of `image` (H, W, C) centred on `centres`, reflected past the border."""
    image = np.asarray(image)
    r = size // 2
    padded = cv2.copyMakeBorder(image, r, r, r, r, cv2.BORDER_REFLECT_101)
    if padded.ndim == 2:
        padded = padded[..., None]
    out = np.empty((len(centres), size, size, padded.shape[2]), image.dtype)
    for i, (y, x) in enumerate(np.asarray(centres, int)):
        out[i] = padded[y : y + size, x : x + size]  # centre (y, x) sits at (y + r, x + r) in `padded`
    return out


def refine_candidates(
    prob: np.ndarray,
    image: np.ndarray,
    score: Callable[[np.ndarray], np.ndarray],
    threshold: float = 0.5,
    fov: np.ndarray | None = None,
    batch: int = 64,
    size: int = PATCH,
    max_candidates: int | None = MAX_CANDIDATES,
    rule: str = "geometric",
) -> tuple[np.ndarray, Candidates, np.ndarray]:
    """(refined map, candidates, PRN score per candidate).

    `score` takes (B, size, size, C) patches of `image` (the enhanced photograph) and returns
    (B,) probabilities that the centre is a microaneurysm. A candidate's pixels become
    `PRN_RULES[rule]` of their map value and the score (sqrt(map x score) by default);
    every other pixel keeps its value. At most `batch` patches are in
    memory at once. Beyond `max_candidates` regions (a weak or confused map), only the most
    probable ones are scored and the others are dropped from the map (score 0), which bounds
    the time the PRN takes on any image.
    """
    if rule not in PRN_RULES:
        raise ValueError(f"rule must be one of {tuple(PRN_RULES)}, not {rule!r}")
    prob = np.asarray(prob, np.float32)
    cands = candidate_regions(prob, threshold, fov)
    if max_candidates is not None and len(cands) > max_candidates:
        keep = np.zeros(len(cands), bool)
        keep[np.argsort(-cands.peaks, kind="stable")[:max_candidates]] = True
        remap = np.zeros(len(cands) + 1, np.int32)
        remap[1:][keep] = np.arange(1, int(keep.sum()) + 1)
        dropped = (cands.labels > 0) & (remap[cands.labels] == 0)
        prob = prob.copy()
        prob[dropped] = 0.0
        cands = Candidates(remap[cands.labels], cands.centres[keep], cands.peaks[keep])
    scores = np.zeros(len(cands), np.float32)
    for start in range(0, len(cands), batch):
        chunk = cands.centres[start : start + batch]
        s = np.asarray(score(patches_at(image, chunk, size)), np.float32).reshape(-1)
        if s.shape != (len(chunk),):
            raise ValueError(f"score returned {s.shape[0]} values for {len(chunk)} patches")
        scores[start : start + len(chunk)] = np.clip(s, 0.0, 1.0)
    out = prob.copy()
    inside = cands.labels > 0
    per_pixel = np.concatenate([[0.0], scores]).astype(np.float32)[cands.labels[inside]]
    out[inside] = PRN_RULES[rule](prob[inside], per_pixel, np.float32(threshold))
    return out, cands, scores


def prn_input(patches: np.ndarray) -> np.ndarray:
    """uint8 (B, S, S, 3) enhanced patches -> the PRN's float32 (B, 3, S, S) input, 0 at "no contrast" (128).

    Training (`training.recipes.ma_prn`) and inference prepare patches with this one function.
    """
    x = (np.asarray(patches, np.float32) - OFFSET) / 64.0
    return np.ascontiguousarray(x.transpose(0, 3, 1, 2))


class PatchScorer:
    """A PRN model folder (`model: ma-prn`): P(microaneurysm at the centre) of enhanced patches."""

    @classmethod
    def from_folder(cls, model_dir, config: dict, device: str = "cpu") -> "PatchScorer":
        from ..io.errors import RetinaInputError
        from ..nets.patch_classifier import PatchClassifier
        from .folder import load_state_dict

        self = cls()
        try:
            net = PatchClassifier.from_config(config["net"])
            net.load_state_dict(load_state_dict(model_dir), strict=True)
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise RetinaInputError(f"{model_dir}: weights do not match config.json ({str(e).splitlines()[0]})") from None
        self.setup(net, config, device)
        self.model_dir = model_dir
        return self

    def setup(self, net, config: dict, device: str = "cpu") -> None:
        import torch

        self.config, self.device = config, torch.device(device)
        self.net = net.to(self.device)
        self.version = str(config.get("version", "unknown"))
        self.model_dir = None

    def __call__(self, patches: np.ndarray) -> np.ndarray:
        """(B,) probabilities of uint8 (B, S, S, 3) enhanced patches; the network's mode is kept
        (training validates and refreshes its sampling with this)."""
        import torch

        from .precision import inference_precision

        was = self.net.training
        self.net.eval()
        try:
            with torch.inference_mode(), inference_precision(self.device):
                x = torch.from_numpy(prn_input(patches)).to(self.device)
                x = x.contiguous(memory_format=torch.channels_last)  # as for the tiles (tiling.torch_predictor)
                return torch.sigmoid(self.net(x).float()).cpu().numpy().reshape(-1)  # float32 even under autocast
        finally:
            self.net.train(was)


FUSIONS = ("arithmetic", "geometric")
OVERLAY_SCALE = 0.25
VARIANTS = ("hgn_1x", "hgn_0.5x", "arithmetic", "geometric", "refined")  # the paper's Table 2 rows


class MicroaneurysmDetector:
    """The detector's model folder (`model: microaneurysms`): two HGNs and the PRN, one checksum.

    weights.safetensors holds the three networks under the prefixes `hgn_full.`, `hgn_half.`
    and `prn.`; config.json their configs (`hgn_full`, `hgn_half`: segmenter configs with
    their working scales; `prn`: the classifier's), the `fusion`, the `candidate_threshold`
    above which regions go to the PRN, and the final `threshold`. The photograph is enhanced
    once and both HGNs map that enhanced image (`preprocess` is applied here, not by each).
    """

    kind = "microaneurysms"
    lesion = "MA"
    proposes = "candidates"  # one proposal per candidate lesion (segmentation.propose_candidates), not blocks

    @classmethod
    def from_folder(cls, model_dir, config: dict, device: str = "cpu") -> "MicroaneurysmDetector":
        from ..io.errors import RetinaInputError
        from ..nets.patch_classifier import PatchClassifier
        from ..nets.segmentation import SegmentationNet
        from .folder import load_state_dict

        state = load_state_dict(model_dir)
        try:
            parts = {"prn": None}  # assembled without a PRN: the fused map is final
            for name in ("hgn_full", "hgn_half", "prn"):
                if name == "prn" and "prn" not in config:
                    continue
                sub = {k[len(name) + 1 :]: v for k, v in state.items() if k.startswith(name + ".")}
                net = (PatchClassifier if name == "prn" else SegmentationNet).from_config(config[name]["net"])
                net.load_state_dict(sub, strict=True)
                parts[name] = net
        except (KeyError, RuntimeError, TypeError, ValueError) as e:
            raise RetinaInputError(f"{model_dir}: weights do not match config.json ({str(e).splitlines()[0]})") from None
        self = cls.from_networks(parts["hgn_full"], parts["hgn_half"], parts["prn"], config, device)
        self.model_dir = model_dir
        return self

    @classmethod
    def from_networks(cls, hgn_full, hgn_half, prn, config: dict, device: str = "cpu") -> "MicroaneurysmDetector":
        from .segmenter import LesionSegmenter

        self = cls()
        self.config = config
        self.model_dir = None
        self.hgns = []
        for net, key in ((hgn_full, "hgn_full"), (hgn_half, "hgn_half")):
            seg = LesionSegmenter.from_network(net, dict(config[key], preprocess="none"), device)
            self.hgns.append(seg)  # they get the enhanced photograph
        self.prn = None
        if prn is not None:
            self.prn = PatchScorer()
            self.prn.setup(prn, config.get("prn", {}), device)
        self.fusion = str(config.get("fusion", "geometric"))
        if self.fusion not in FUSIONS:
            raise ValueError(f"fusion must be one of {FUSIONS}, not {self.fusion!r}")
        self.candidate_threshold = float(config.get("candidate_threshold", 0.5))
        self.prn_rule = str(config.get("prn_rule", "geometric"))
        if self.prn_rule not in PRN_RULES:
            raise ValueError(f"prn_rule must be one of {tuple(PRN_RULES)}, not {self.prn_rule!r}")
        self.logit_offset = float(config.get("fused_logit_offset", 0.0))  # see shift_logits
        self.threshold = float(config.get("threshold", 0.5))
        self.max_candidates = int(config.get("max_candidates", MAX_CANDIDATES))
        self.version = str(config.get("version", "unknown"))
        # the overlay's scale: the map is full size, the overlay a quarter of it a side (a 4288 x 2848
        # map sent to napari after every batch of tiles would cost the GUI more than it shows)
        self.scale = OVERLAY_SCALE
        return self

    @property
    def description(self) -> dict:
        # kind, version and checksum, never the folder: descriptions go into project files,
        # which travel between machines (a folder name can be a user's or a patient's)
        return {"model": self.kind, "version": self.version, "weights_sha256": self.config.get("weights_sha256")}

    @property
    def candidate_floor(self) -> float:
        """A candidate lesion is a connected region of the final map above this (the slider moves the
        threshold within it): `candidate_floor` in config.json, else half the threshold in use."""
        floor = self.config.get("candidate_floor")
        return float(floor) if floor is not None else self.threshold / 2

    def variant_names(self) -> tuple[str, ...]:
        """The stages `maps` gives (without a PRN, "refined" is the fused map itself)."""
        return VARIANTS if self.prn is not None else VARIANTS[:-1]

    def maps(self, rgb: np.ndarray, fov: np.ndarray | None = None, progress=None, cancelled=None,
             preview=None, refine: bool = True, rows: tuple[str, ...] | None = None,
             preview_every: float = 0.0) -> dict[str, np.ndarray]:
        """Every stage's full-size map: the paper's Table 2 rows (`VARIANTS`), from one pass of each network.

        The fused maps are recalibrated by `fused_logit_offset` (config.json; `shift_logits`).
        `refine=False` stops before the PRN: no "refined" map, but the "enhanced" photograph.
        `rows`: only these of the HGN and fusion rows (the detector's own fusion always; each
        row is a pass over 12 megapixels, which detection alone does not need)."""
        from ..fundus import field_of_view_mask

        if fov is None:
            fov = field_of_view_mask(rgb)
        enhanced = subtract_local_background(rgb, fov)
        counts = [seg.tile_count(rgb.shape[:2], fov) for seg in self.hgns]
        total = sum(counts) + 1  # + the PRN

        def stage_progress(offset):
            return None if progress is None else (lambda k, n: progress(offset + k, total))

        small_preview = None
        if preview is not None:
            from .segmenter import probability_to_uint8, scaled_size

            def small_preview(m):  # the full-scale network's map as it fills, at the overlay's scale, 0-255
                small = cv2.resize(m, scaled_size(m.shape, OVERLAY_SCALE), interpolation=cv2.INTER_AREA).astype(np.float32) * np.float32(1 / 255)
                preview(probability_to_uint8(shift_logits(small, self.logit_offset)))
        full = self.hgns[0].probability(enhanced, fov, progress=stage_progress(0), cancelled=cancelled,
                                        preview=small_preview, preview_every=preview_every)
        half = self.hgns[1].probability(enhanced, fov, progress=stage_progress(counts[0]), cancelled=cancelled)
        # every row on the fused map's recalibrated scale (the order of pixels, hence AUPR, is each
        # map's own; the raw maps crowd near 1, where the 8-bit levels of the scores cannot tell them apart)
        wanted = set(VARIANTS[:-1] if rows is None else rows) | {self.fusion}
        out = {}
        for name in VARIANTS[:-1]:
            if name in wanted:
                raw = full if name == "hgn_1x" else half if name == "hgn_0.5x" else fuse_maps(full, half, name)
                out[name] = shift_logits(raw, self.logit_offset)
        if not refine:
            return {**out, "enhanced": enhanced}  # what the PRN would see, for the caller to refine
        fused = out[self.fusion]
        if cancelled is not None and cancelled():
            from .tiling import TilingCancelled

            raise TilingCancelled("cancelled before the refinement network")
        if self.prn is not None:
            refined, _, _ = refine_candidates(fused, enhanced, self.prn, self.candidate_threshold, fov,
                                              max_candidates=self.max_candidates, rule=self.prn_rule)
            out["refined"] = refined
        else:
            out["refined"] = fused
        if progress is not None:
            progress(total, total)
        return out

    def probability(self, rgb, fov=None, progress=None, cancelled=None, preview=None, on_block=None,
                    block: int = 512, preview_every: float = 0.0) -> np.ndarray:
        prob = self.maps(rgb, fov, progress=progress, cancelled=cancelled, preview=preview, rows=(),
                         preview_every=preview_every)["refined"]
        if on_block is not None:  # the map is final only once the PRN has run: every block at the end
            h, w = prob.shape
            for r0 in range(0, h, block):
                for c0 in range(0, w, block):
                    box = (r0, min(r0 + block, h), c0, min(c0 + block, w))
                    on_block(box, prob[box[0] : box[1], box[2] : box[3]].copy())
        return prob

    def segment(self, rgb, fov=None, progress=None, cancelled=None, preview=None, on_block=None, block: int = 512,
                preview_every: float = 0.0):
        import time

        from .segmenter import Segmentation

        t0 = time.perf_counter()
        prob = self.probability(rgb, fov, progress=progress, cancelled=cancelled, preview=preview,
                                on_block=on_block, block=block, preview_every=preview_every)
        return Segmentation(self.lesion, prob, self.threshold, time.perf_counter() - t0)


MA_RADIUS = (1.5, 20.0)  # px; IDRiD's microaneurysm masks: radius 5.6-13.7 px (10th-90th percentile), median 8.9
MA_TYPICAL_RADIUS = 9.0  # where no dark spot stands out, a disc of the median size


def snap_microaneurysm(rgb: np.ndarray, point, search: int = 8, window: int = 40) -> tuple[tuple[int, int], float]:
    """Where a grader's click on a microaneurysm lands: ((row, col) of the dark centre, radius in px).

    The centre is the darkest pixel of the smoothed green channel (where microaneurysms show
    most contrast) within `search` px of the click; the radius is where the mean of a ring
    around it climbs back half way from the centre to the local background (the median of a
    (2 window + 1)^2 neighbourhood), so a larger dot gets a larger disc; kept within `MA_RADIUS`
    (IDRiD's microaneurysm masks on 4288-px photographs: radius 5.6-13.7 px for 80 % of them).
    """
    h, w = rgb.shape[:2]
    r, c = int(round(point[0])), int(round(point[1]))
    if not (0 <= r < h and 0 <= c < w):
        raise ValueError(f"point {point} lies outside the image ({h} x {w})")
    r0, r1, c0, c1 = max(0, r - window), min(h, r + window + 1), max(0, c - window), min(w, c + window + 1)
    green = np.asarray(rgb[r0:r1, c0:c1, 1] if rgb.ndim == 3 else rgb[r0:r1, c0:c1], np.float32)
    # sigma 3 puts the minimum at the dot's middle rather than at its darkest speck (mean IoU
    # with IDRiD's masks 0.59 against 0.43 at sigma 1: benchmarks/ma_click.py)
    smooth = cv2.GaussianBlur(green, (0, 0), 3.0)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    near = (yy - r) ** 2 + (xx - c) ** 2 <= search**2
    k = int(np.argmin(np.where(near, smooth, np.inf)))
    cy, cx = np.unravel_index(k, smooth.shape)
    centre = (r0 + int(cy), c0 + int(cx))
    background = float(np.median(smooth))
    low = float(smooth[cy, cx])
    radius = MA_TYPICAL_RADIUS  # no dark spot to measure (a flat or noisy place)
    if background - low > 1.0:
        half = low + (background - low) / 2
        dist = np.sqrt((yy - centre[0]) ** 2 + (xx - centre[1]) ** 2)
        for rad in np.arange(1.0, MA_RADIUS[1] + 0.5, 0.5):
            ring = (dist >= rad - 0.5) & (dist < rad + 0.5)
            if ring.any() and float(smooth[ring].mean()) >= half:
                radius = rad
                break
    return centre, float(np.clip(radius, *MA_RADIUS))


def disc_box(centre, radius: float, shape) -> tuple[tuple[int, int, int, int], np.ndarray]:
    """(box, bool mask on the box) of a filled disc, clipped to an image of `shape`."""
    h, w = shape[:2]
    rr = int(np.ceil(radius))
    r0, r1 = max(0, centre[0] - rr), min(h, centre[0] + rr + 1)
    c0, c1 = max(0, centre[1] - rr), min(w, centre[1] + rr + 1)
    yy, xx = np.mgrid[r0:r1, c0:c1]
    return (r0, r1, c0, c1), (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


def lesion_under(mask: np.ndarray, point, window: int = 30):
    """(box, bool mask on the box) of the connected lesion (8-connectivity) under `point`, or None.

    Looked for within `window` px of the point only (a click works on one small lesion; a
    lesion running past the window is cut there).
    """
    from ..metrics import label_lesions

    h, w = mask.shape
    r, c = int(round(point[0])), int(round(point[1]))
    if not (0 <= r < h and 0 <= c < w) or not mask[r, c]:
        return None
    r0, r1, c0, c1 = max(0, r - window), min(h, r + window + 1), max(0, c - window), min(w, c + window + 1)
    labels, _ = label_lesions(mask[r0:r1, c0:c1])
    return (r0, r1, c0, c1), labels == labels[r - r0, c - c0]
