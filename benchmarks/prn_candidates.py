"""Does a refinement network (PRN) tell the detector's candidates apart better than the map itself?

    .venv/bin/python benchmarks/prn_candidates.py --data IDRID_TRAIN \\
        --prn PRN_DIR [PRN_DIR ...] [--detector DIR]

On the detector's validation images (its config.json), runs the two hypothesis networks once
per image and keeps the fused map's candidate regions (the detector's candidate threshold),
then scores every candidate with each PRN. Prints, per PRN:

- candidate level: how many candidates touch a microaneurysm of the ground truth, and the ROC
  AUC with which the fused map's peak, the PRN's score, and a logistic regression on both
  (fitted leaving one image out) rank the true candidates above the false ones;
- pixel level: the pooled AUPR of the fused map, and of the map refined by each way of
  combining it with the PRN's score (the detector's `prn_rule`: geometric or rerank);
- lesion level: the FROC score (mean sensitivity at 1/8 ... 8 false positives per image) of
  each map, as `napari-retina evaluate ma` counts it (`metrics.LesionFROC`, candidates above
  0.1 scored by their highest probability).

A PRN helps only where its score adds to what the map's peak already knows. The HGN maps are
computed once and reused for every PRN and rule: about 20 s per image on one core.
"""

from __future__ import annotations

import argparse
import json
import platform
import sys
from pathlib import Path

import numpy as np

from napari_retina.models.microaneurysms import PRN_RULES  # the detector's own rules

RULES = {
    "fused map (no PRN)": None,
    "sqrt(map x score) (prn_rule geometric, the paper's)": PRN_RULES["geometric"],
    "map x score": lambda p, s, t: p * s,
    "map^0.9 x score^0.1": lambda p, s, t: p**0.9 * s**0.1,
    "t + (map - t) x score (prn_rule rerank: stays a candidate)": PRN_RULES["rerank"],
}


def roc_auc(y: np.ndarray, score: np.ndarray) -> float:
    """ROC AUC, or NaN where the candidates hold one class only. Unlike training's `roc_auc`, which
    returns 0.5 there so that early stopping can go on, a printed table should show "undefined"."""
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, score)) if 0 < y.sum() < len(y) else float("nan")


def main() -> int:
    p = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    p.add_argument("--data", required=True, help="an IDRiD-layout folder with the detector's validation images")
    p.add_argument("--prn", nargs="+", required=True, help="PRN model folders (model: ma-prn)")
    p.add_argument("--detector", help="microaneurysm detector folder (default: the version in use)")
    a = p.parse_args()

    from sklearn.linear_model import LogisticRegression

    from napari_retina.fundus import field_of_view_mask
    from napari_retina.io.datasets import open_dataset
    from napari_retina.io.images import read_fundus
    from napari_retina.io.masks import read_mask
    from napari_retina.metrics import LesionFROC, PixelPR
    from napari_retina.models.microaneurysms import MAX_CANDIDATES, refine_candidates
    from napari_retina.models.registry import load_model
    from napari_retina.models.versions import current_model_dir

    det_dir = Path(a.detector) if a.detector else current_model_dir("microaneurysms")
    det = load_model(det_dir, expect="microaneurysms")
    prns = {Path(d).name: load_model(Path(d), expect="ma-prn") for d in a.prn}
    names = json.loads((det_dir / "config.json").read_text()).get("validation_images") or []
    ds = open_dataset(Path(a.data))
    records = [r for r in (ds.records if ds else []) if r.image.name in names and "MA" in r.masks]
    if not records:
        print(f"{a.data}: none of the detector's validation images with an MA mask", file=sys.stderr)
        return 2
    t = det.candidate_threshold
    pixel = {(n, r): PixelPR() for n in prns for r in RULES}
    froc = {(n, r): LesionFROC(candidate_threshold=0.1) for n in prns for r in RULES}
    cand = {n: [] for n in prns}  # per PRN: (image, peak, score, area, true)
    for i, rec in enumerate(records):
        rgb = read_fundus(rec.image)
        fov = field_of_view_mask(rgb)
        gt = read_mask(rec.masks["MA"], expected_shape=rgb.shape[:2]) & fov
        maps = det.maps(rgb, fov, refine=False, rows=())
        fused = maps[det.fusion]
        for n, prn in prns.items():
            _, cands, scores = refine_candidates(fused, maps["enhanced"], prn, t, fov, max_candidates=MAX_CANDIDATES)
            lab = cands.labels
            inside = lab > 0
            per_pixel = np.concatenate([[0.0], scores]).astype(np.float32)[lab[inside]]
            for r, rule in RULES.items():
                out = fused.copy()
                if rule is not None:
                    out[inside] = rule(fused[inside], per_pixel, t)
                pixel[n, r].add(out, gt, fov)
                froc[n, r].add(out, gt, fov)
            k = len(cands)
            true = np.zeros(k + 1, bool)
            true[np.unique(lab[gt & inside])] = True
            area = np.bincount(lab.ravel(), minlength=k + 1)[1:]
            cand[n] += [(i, pk, s, ar, tr) for pk, s, ar, tr in zip(cands.peaks, scores, area, true[1:])]
        print(f"{rec.image.name}: {len(cands)} candidates", file=sys.stderr, flush=True)

    def logit(v):
        v = np.clip(np.asarray(v, float), 1e-4, 1 - 1e-4)
        return np.log(v / (1 - v))

    for n in prns:
        c = np.array(cand[n], float)
        img, peak, score, area, y = c[:, 0], c[:, 1], c[:, 2], c[:, 3], c[:, 4].astype(bool)
        x = np.c_[logit(peak), logit(score), np.log(area)]
        both = np.zeros(len(y))
        for k in np.unique(img):  # leave one image out
            test = img == k
            if y[~test].any() and (~y[~test]).any():
                both[test] = LogisticRegression().fit(x[~test][:, :2], y[~test]).predict_proba(x[test][:, :2])[:, 1]
        print(f"\n## {n}: {int(y.sum())} of {len(y)} candidates touch a microaneurysm ({len(records)} images, "
              f"candidate threshold {t:.2f})")
        print("| ranks the candidates by | ROC AUC |\n|---|---|")
        print(f"| the fused map's peak | {roc_auc(y, peak):.3f} |")
        print(f"| the PRN's score | {roc_auc(y, score):.3f} |")
        print(f"| both (logistic regression, leave one image out) | {roc_auc(y, both):.3f} |")
        print("\n| map | pixel AUPR | FROC score | sensitivity at 1/8 ... 8 FP / image |\n|---|---|---|---|")
        for r in RULES:
            pts = " / ".join(f"{v:.2f}" for v in froc[n, r].points().values())
            print(f"| {r} | {pixel[n, r].aupr():.4f} | {froc[n, r].score():.3f} | {pts} |")
    print(f"\ndetector {det.version}; machine: {platform.machine()}; command: .venv/bin/python "
          f"benchmarks/prn_candidates.py {' '.join(sys.argv[1:])}")
    return 0


if __name__ == "__main__":
    sys.exit(main())
