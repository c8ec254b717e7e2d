"""python -m training microaneurysms: assemble the detector's model folder from its three networks.

    python -m training microaneurysms --hgn-full DIR --hgn-half DIR [--prn DIR] --out MODEL_DIR
        [--fusion geometric|arithmetic] [--candidate-threshold 0.5] [--data DIR [--threshold T]]

Takes the two hypothesis networks (`python -m training ma-hgn --scale 1.0`, `--scale 0.5`) and
the refinement network (`python -m training ma-prn`; without it, the detector is the fused
HGN map alone, the paper's "FCN geometric/arithmetic" rows) and writes one model folder
(`model: microaneurysms`): the three weight sets in one weights.safetensors under the
prefixes hgn_full., hgn_half. and prn., one checksum, one card naming the parts' versions.

With --data (the HGNs' validation images, at full resolution): the fused map's logit offset
(`fused_logit_offset`: the networks learn with class-weighted losses, so their raw maps crowd
near 1; the offset puts the fused map's best-F1 threshold at 0.5, see `shift_logits`), then
the final threshold with the best pooled F1 of the refined map. Else no offset and
--threshold (default 0.5).
"""

from __future__ import annotations

import argparse
import datetime
import json
from pathlib import Path

import numpy as np

from napari_retina import __version__
from napari_retina.io.errors import RetinaInputError

from ..data import DataError
from ._main import PATH_RULE, portable_command, portable_path, portable_record


def build_parser() -> argparse.ArgumentParser:
    p = argparse.ArgumentParser(prog="python -m training microaneurysms",
                                description="Assemble the microaneurysm detector from its two HGNs and its PRN.")
    p.add_argument("--hgn-full", required=True, metavar="DIR", help="ma-hgn model folder trained at --scale 1.0")
    p.add_argument("--hgn-half", required=True, metavar="DIR", help="ma-hgn model folder trained at --scale 0.5")
    p.add_argument("--prn", metavar="DIR", help="ma-prn model folder (without it: no refinement)")
    p.add_argument("--out", required=True, metavar="MODEL_DIR")
    p.add_argument("--fusion", choices=("geometric", "arithmetic"), default="geometric")
    p.add_argument("--candidate-threshold", type=float, default=0.5,
                   help="fused-map value above which a region goes to the PRN (default 0.5, the paper's)")
    p.add_argument("--prn-rule", choices=tuple(RULE_WORDS), default="geometric",
                   help="how a candidate's map value p and its PRN score s combine: geometric, sqrt(p x s) (the "
                        "paper's); rerank, t + (p - t) x s (every candidate stays one, the PRN orders them); "
                        "default %(default)s")
    p.add_argument("--data", metavar="DIR", help="choose the threshold on the HGNs' validation images of DIR")
    p.add_argument("--threshold", type=float, default=0.5, help="the threshold when no --data (default 0.5)")
    p.add_argument("--score", action="store_true",
                   help="with --data: score the written folder on its validation images (`napari-retina evaluate ma "
                        "--split val --variants`) and write the figures into its card and config")
    p.add_argument("--logit-offset", type=float, default=0.0,
                   help="the fused map's logit offset when no --data (default 0: none); e.g. another detector's, "
                        "to compare refinement networks on the same candidates")
    p.add_argument("--device", default="cpu")
    p.add_argument("--version", default=None)
    p.add_argument("--quiet", action="store_true")
    return p


def _validate_args(p: argparse.ArgumentParser, a: argparse.Namespace) -> None:
    for name in ("candidate_threshold", "threshold"):
        if not 0 < getattr(a, name) < 1:
            p.error(f"--{name.replace('_', '-')} must lie between 0 and 1, not {getattr(a, name)}")
    if a.score and not a.data:
        p.error("--score scores the detector on the validation images of --data DIR: give --data with it")
    if a.prn_rule != "geometric" and not a.prn:
        p.error("--prn-rule combines the refinement network's score: give --prn DIR with it")


RULE_WORDS = {"geometric": "pixels sqrt(map x score)",
              "rerank": "pixels t + (map - t) x score: every candidate stays one, ordered by map and score"}
from ._segmenter import LOGIT_LEVELS as LOGIT_BINS, LOGIT_RANGE  # noqa: E402  (one logit grid for both)


def calibrate_and_threshold(detector, data: Path, names: list[str], say=print) -> dict:
    """Choose the fused map's logit offset and the final threshold on the validation images of `data`.

    1. The fused map (HGNs only) of each image; the offset is the logit of the threshold with
       the best pooled F1 of that map, found on a histogram of logits (the raw map crowds near
       1, where 8-bit levels cannot tell pixels apart), so the recalibrated map has its best
       F1 at 0.5 and the candidate threshold means what it says.
    2. The PRN on the recalibrated map's candidates; the final threshold is the one with the
       best pooled F1 of the refined map.
    Returns {"fused_logit_offset", "fused_f1", "threshold", "validation_f1", "images"}.
    """
    from napari_retina.evaluation import _records
    from napari_retina.fundus import field_of_view_mask
    from napari_retina.io.images import read_fundus
    from napari_retina.metrics import PixelPR
    from napari_retina.models.microaneurysms import refine_candidates, shift_logits
    from napari_retina.session import graders_mask

    records = _records(data, "val", names)
    if not records:
        raise DataError(f"{data}: none of the validation images {', '.join(names[:3])}...")
    detector.logit_offset = 0.0
    edges = np.linspace(-LOGIT_RANGE, LOGIT_RANGE, LOGIT_BINS + 1)
    pos, neg = np.zeros(LOGIT_BINS, np.int64), np.zeros(LOGIT_BINS, np.int64)
    kept = []
    for rec in records:
        rgb = read_fundus(rec.image)
        gt = graders_mask(rec, "MA", rgb.shape[:2])
        if gt is None:
            continue  # no label here
        fov = field_of_view_mask(rgb)
        out = detector.maps(rgb, fov, refine=False, rows=())
        fused = out[detector.fusion]
        p = np.clip(fused[fov], 1e-7, 1 - 1e-7).astype(np.float64)
        logit = np.log(p) - np.log1p(-p)
        g = gt[fov]
        pos += np.histogram(logit[g], edges)[0]
        neg += np.histogram(logit[~g], edges)[0]
        kept.append((fused, out["enhanced"], gt, fov))
        say(f"  {rec.image.name}: fused map done")
    if not kept:
        raise DataError(f"{data}: no microaneurysm masks for the validation images")
    tp = np.cumsum(pos[::-1])[::-1]  # pixels with logit >= edges[k]
    fp = np.cumsum(neg[::-1])[::-1]
    f1 = 2 * tp / np.maximum(2 * tp + fp + (pos.sum() - tp), 1)
    k = int(np.argmax(f1))
    offset = round(float(edges[k]), 4)
    detector.logit_offset = offset
    pr = PixelPR()
    for fused, enhanced, gt, fov in kept:
        calibrated = shift_logits(fused, offset)
        if detector.prn is not None:
            calibrated, _, _ = refine_candidates(calibrated, enhanced, detector.prn, detector.candidate_threshold, fov,
                                                 max_candidates=detector.max_candidates, rule=detector.prn_rule)
        pr.add(np.round(np.clip(calibrated, 0, 1) * 255).astype(np.uint8), gt, region=fov)
    best, best_t = -1.0, 0.5
    for level in range(1, 255):
        tp_, fp_, fn_, _ = pr.counts(level)
        f = 2 * tp_ / (2 * tp_ + fp_ + fn_) if tp_ + fp_ + fn_ else 0.0
        if f > best:
            best, best_t = f, (level - 0.5) / 255  # p >= t keeps exactly the levels >= `level`
    return {"fused_logit_offset": offset, "fused_f1": round(float(f1[k]), 4), "threshold": round(best_t, 6),
            "validation_f1": round(best, 4), "images": len(kept)}


def run(a: argparse.Namespace, argv: list[str]) -> int:
    from napari_retina.models.folder import load_state_dict, write_model_folder
    from napari_retina.models.microaneurysms import MicroaneurysmDetector
    from napari_retina.models.registry import check_model_folder
    from napari_retina.nets.patch_classifier import PatchClassifier
    from napari_retina.nets.segmentation import SegmentationNet

    say = (lambda *x: None) if a.quiet else (lambda *x: print(*x, flush=True))
    parts, configs, nets = {}, {}, {}
    for key, folder, kind in (("hgn_full", a.hgn_full, "ma-hgn"), ("hgn_half", a.hgn_half, "ma-hgn"),
                              ("prn", a.prn, "ma-prn")):
        if folder is None:
            continue
        cfg = check_model_folder(Path(folder), expect=kind)
        configs[key] = cfg
        state = load_state_dict(Path(folder))
        parts.update({f"{key}.{k}": v for k, v in state.items()})
        nets[key] = (PatchClassifier if key == "prn" else SegmentationNet).from_config(cfg["net"])
        nets[key].load_state_dict(state, strict=True)
    if configs["hgn_full"].get("input_scale") != 1.0 or configs["hgn_half"].get("input_scale") != 0.5:
        raise RetinaInputError("--hgn-full must be an ma-hgn model at scale 1.0 and --hgn-half one at scale 0.5 "
                               f"(got {configs['hgn_full'].get('input_scale')} and {configs['hgn_half'].get('input_scale')})")
    keep = ("net", "input_scale", "tile", "overlap", "threshold", "preprocess", "version", "lesion", "rim_margin")
    config = {
        "model": "microaneurysms",
        "lesion": "MA",
        "version": a.version or datetime.date.today().strftime("%Y.%m.%d-microaneurysms"),
        "fusion": a.fusion,
        "candidate_threshold": a.candidate_threshold,
        **({"prn_rule": a.prn_rule} if a.prn else {}),
        "threshold": a.threshold,
        "fused_logit_offset": a.logit_offset,
        "preprocess": "enhance",
        "validation_images": configs["hgn_full"].get("validation_images", []),
        **{k: {kk: v for kk, v in configs[k].items() if kk in keep} for k in configs},
        "parts": {k: {"version": c.get("version"), "weights_sha256": c.get("weights_sha256"),
                      "training": portable_record(c.get("training", {}))} for k, c in configs.items()},
        "assembled": {"command": portable_command("python -m training microaneurysms", argv),
                      "paths": PATH_RULE,
                      "napari_retina": __version__,
                      "when": datetime.datetime.now(datetime.timezone.utc).isoformat(timespec="seconds")},
    }
    detector = MicroaneurysmDetector.from_networks(nets["hgn_full"], nets["hgn_half"], nets.get("prn"), config, a.device)
    if a.data:
        cal = calibrate_and_threshold(detector, Path(a.data), config["validation_images"], say)
        config.update({k: cal[k] for k in ("fused_logit_offset", "threshold", "validation_f1")})
        say(f"fused map recalibrated by a logit offset of {cal['fused_logit_offset']:.2f} (its best pooled F1, "
            f"{cal['fused_f1']:.3f}, now at 0.5); threshold {cal['threshold']:.3f} (pooled F1 "
            f"{cal['validation_f1']:.3f} on {cal['images']} validation images)")
    lines = [f"- {k}: {c.get('version')}, weights SHA-256 {c.get('weights_sha256')} ({c.get('training', {}).get('epochs', '?')} epochs, "
             f"{c.get('training', {}).get('minutes', '?')} min on {c.get('training', {}).get('device', '?')})"
             for k, c in configs.items()]
    card = f"""# Microaneurysm detector {config['version']}

Two hypothesis networks on the contrast-enhanced photograph (full and half scale), fused by
{a.fusion} mean, {'candidate regions above ' + str(a.candidate_threshold) + ' rescored by the patch-wise refinement network (' + RULE_WORDS[a.prn_rule] + ')' if 'prn' in configs else 'no refinement network'};
fused map recalibrated by a logit offset of {config.get('fused_logit_offset', 0.0)} (chosen on the validation images);
threshold {config['threshold']:.3f}. Assembled by napari-retina {__version__}:
`{config['assembled']['command']}` ({PATH_RULE})

{chr(10).join(lines)}

Validation images (held out by image): {', '.join(config['validation_images'])}

Scores: `napari-retina evaluate ma --data DIR --model THIS_FOLDER --split val --variants`.

weights.safetensors SHA-256: {{sha256}}
"""
    write_model_folder(Path(a.out), parts, config, card)
    if a.score:
        scores = score_folder(Path(a.out), Path(a.data), config["validation_images"], a.device, say)
        config["validation_scores"] = scores
        card = card.replace("Scores: `napari-retina evaluate ma --data DIR --model THIS_FOLDER --split val --variants`.",
                            scores_paragraph(scores))
        write_model_folder(Path(a.out), parts, config, card)  # the same weights; config and card now with the figures
    say(f"model folder: {a.out}")
    return 0


def score_folder(folder: Path, data: Path, names: list[str], device: str, say=print) -> dict:
    """The written detector's figures on its validation images, as `evaluate ma --split val --variants` gives them."""
    from napari_retina.segmentation import evaluate_variants, load_segmenter

    detector = load_segmenter("MA", folder, device=device)
    result = evaluate_variants(data, detector, split="val", validation_images=names,
                               progress=lambda k, n, stem: say(f"  scoring {k}/{n} {stem}"))
    keep = ("aupr", "f1", "precision", "recall", "iou", "froc", "froc_score", "images", "seconds_per_image")
    scores = {k: result[k] for k in keep}
    scores.update({k: result["lesion_level"][k] for k in ("lesion_sensitivity", "fp_per_image")})
    scores["variants"] = {k: {"aupr": v["aupr"], "froc_score": v["froc_score"]} for k, v in result["variants"].items()}
    scores["measured"] = datetime.date.today().isoformat()
    scores["data"] = portable_path(data)
    return scores


def scores_paragraph(s: dict) -> str:
    """The card's validation figures, in words (what `score_folder` measured)."""
    def f(v, digits=3):
        return "n/a" if v is None else f"{v:.{digits}f}"

    rows = ", ".join(f"{k} {f(v['aupr'])} (FROC {f(v['froc_score'])})" for k, v in s["variants"].items())
    froc = "/".join(f(v, 2) for v in s["froc"].values())  # at 1/8 ... 8 false positives per image
    return (f"Scores on the {s['images']} validation images above (measured {s['measured']} at assembly, "
            f"`napari-retina evaluate ma --data {s['data']} --model THIS_FOLDER --split val --variants`): "
            f"pixel AUPR {f(s['aupr'])}, F1 {f(s['f1'])} (precision {f(s['precision'])}, recall {f(s['recall'])}) "
            f"at the threshold, IoU {f(s['iou'])}; lesion sensitivity {f(s['lesion_sensitivity'], 2)} at "
            f"{f(s['fp_per_image'], 1)} false positives per image; FROC sensitivities at 1/8 to 8 false positives "
            f"per image {froc}, score {f(s['froc_score'])}. Every stage (the paper's Table 2 rows), pixel AUPR: "
            f"{rows}.")


def main(argv: list[str] | None = None) -> int:
    from ._main import recipe_main

    return recipe_main("microaneurysms", build_parser, _validate_args, run, argv)
