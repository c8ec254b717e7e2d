"""Command line: `napari-retina open PATH` (a bare PATH means the same).

With no arguments it opens the shipped IDRiD sample. Errors a user can cause
print one line and exit with code 2. napari is imported only by `open`, so
headless subcommands start fast on machines without a display.
"""

from __future__ import annotations

import argparse
import math
import sys
from pathlib import Path

from . import __version__
from .io.errors import RetinaInputError

SUBCOMMANDS = ("open", "refine", "segment", "evaluate")
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line message for the user; exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's own code), no usage dump
        self.exit(EXIT_USAGE, f"napari-retina: error: {message}\n")


def _segmenter_evaluate_args(sp, what: str) -> None:
    """The options `evaluate ex` and `evaluate ma` share."""
    sp.add_argument("--data", required=True, metavar="DIR", help="IDRiD-layout (official or flat) or project folder")
    sp.add_argument("--model", metavar="DIR", help=f"{what} model folder (default: the version in use; first the shipped one)")
    sp.add_argument("--split", choices=("val", "all"), default="all", help="val: only the model card's validation images")
    sp.add_argument("--images-of", metavar="MODEL_DIR",
                    help="with --split val: that model's validation images (compare two versions)")
    sp.add_argument("--limit", type=int, help="only the first N images")
    sp.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    sp.add_argument("--out", metavar="FILE.json", help="also write the JSON here")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="napari-retina",
        description="Lesion annotation of colour fundus photographs in napari (IDRiD convention).",
        epilog="A bare PATH means `open PATH`; no arguments open the IDRiD sample.",
    )
    p.add_argument("--version", action="version", version=f"napari-retina {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{open,refine,segment,evaluate}")
    o = sub.add_parser(
        "open",
        help="open a fundus image, an IDRiD-layout folder or an annotation project in napari",
        description="Open PATH in napari with the lesion annotator docked.",
    )
    o.add_argument("path", nargs="?", help="image (.jpg .png .tif), folder or <stem>.retina project; default: IDRiD sample")
    o.add_argument("--project-root", metavar="DIR", help="save annotation projects under DIR instead of beside the images")
    o.add_argument("--grader", metavar="NAME", help="grader name recorded in provenance.json")
    r = sub.add_parser(
        "refine",
        help="turn coarse ellipses into pixel masks (writes <stem>_<LESION>.tif)",
        description="Refine the ellipses of FILE.json on IMAGE into binary masks in DIR.",
    )
    r.add_argument("image", help="fundus image")
    r.add_argument("--ellipses", required=True, metavar="FILE.json", help="ellipse JSON")
    r.add_argument("--out", required=True, metavar="DIR", help="output folder (created)")
    r.add_argument("--model", metavar="DIR", help="refiner model folder (default: the version in use; first the shipped one)")
    r.add_argument("--threshold", type=float, help="probability threshold (default: the model's)")
    r.add_argument("--superpixels", choices=("on", "off"), help="superpixel-guided prototype weighting (default: the model's)")
    s = sub.add_parser(
        "segment",
        help="find a lesion in whole images (writes <stem>_<LESION>.tif and _prob.tif, or pre-annotates projects)",
        description=(
            "Run a lesion segmenter over fundus images or folders. With --out: DIR/<stem>_<LESION>.tif "
            "(binary, 1-bit palette) and DIR/<stem>_<LESION>_prob.tif (uint8 0-255). With --into-projects: "
            "the candidates go into each image's annotation project as pending model proposals, never over the "
            "grader's own pixels; its masks stay as confirmed (empty in a new project) until a grader accepts."
        ),
    )
    s.add_argument("paths", nargs="+", metavar="IMAGE_OR_FOLDER", help="fundus images or folders of them")
    s.add_argument("--lesion", required=True, type=str.upper, choices=("EX", "MA"), help="lesion to find")
    where = s.add_mutually_exclusive_group(required=True)
    where.add_argument("--out", metavar="DIR", help="write masks and probability maps here (created)")
    where.add_argument("--into-projects", action="store_true", help="pre-annotate each image's annotation project (pending proposals; the masks change only when accepted)")
    s.add_argument("--project-root", metavar="DIR", help="with --into-projects: projects under DIR, not beside the images")
    s.add_argument("--model", metavar="DIR", help="segmentation model folder (default: the version in use; first the shipped one)")
    s.add_argument("--threshold", type=float, help="probability threshold of the mask (default: the model's)")
    s.add_argument("--device", default="cpu", help="cpu or cuda (default cpu)")
    e = sub.add_parser("evaluate", help="score a model on an IDRiD-layout folder (prints JSON)")
    esub = e.add_subparsers(dest="what", metavar="{refine,ex,ma}")
    ee = esub.add_parser(
        "ex",
        help="hard-exudate segmenter: pixel AUPR (pooled, IDRiD challenge), figures at the threshold, FROC",
        description=(
            "Segment every image of DIR's split and print JSON: aupr (pixel level, pooled over the split's "
            "field-of-view pixels), precision, recall, f1, iou, sensitivity, specificity at the model's "
            "threshold (pooled, and averaged per image), lesion-level figures and FROC points "
            "(8-connectivity, a predicted lesion counts when it touches a ground-truth lesion), seconds per image."
        ),
    )
    _segmenter_evaluate_args(ee, "segmentation")
    em = esub.add_parser(
        "ma",
        help="microaneurysm detector: pixel AUPR (pooled, IDRiD challenge), figures at the threshold, FROC",
        description=(
            "Detect microaneurysms in every image of DIR's split and print JSON with the keys of `evaluate ex` "
            "(aupr, precision, recall, f1, iou, lesion-level figures, FROC at 1/8 to 8 false positives per "
            "image, seconds per image); with --variants also the paper's Table 2 rows (HGN 1x, HGN 0.5x, "
            "arithmetic and geometric fusion, refined) under `variants`."
        ),
    )
    _segmenter_evaluate_args(em, "microaneurysm")
    em.add_argument("--variants", action="store_true", help="also score every stage of the detector (Table 2)")
    er = esub.add_parser(
        "refine",
        help="coarse ellipse refinement: image-level IoU per lesion (paper Table 1, Fig. 3), IoU by ellipse size, latency",
        description=(
            "Simulate coarse ellipses from the fine masks of DIR, refine them and print JSON: image-level IoU "
            "per lesion at --reduction (iou_percent) and at each of --reductions (by_reduction), IoU inside "
            "the ellipses pooled by semi-major axis < 32, 32-128, > 128 px (by_size), and the latency per ellipse."
        ),
    )
    er.add_argument("--data", required=True, metavar="DIR", help="IDRiD-layout (official or flat) or project folder")
    er.add_argument("--reduction", type=float, default=1.0, help="ellipses = connected lesions / reduction (default 1.0)")
    er.add_argument(
        "--reductions",
        nargs="*",
        metavar="R",
        default=None,
        help="reductions of the by_reduction and by_size figures (default 1.0 1.5 2.0; 'none' or no value: skip them)",
    )
    er.add_argument("--model", metavar="DIR", help="refiner model folder (default: the version in use; first the shipped one)")
    er.add_argument("--baseline", metavar="DIR", help="baseline (non-prototypical) model folder to compare")
    er.add_argument("--split", choices=("val", "all"), default="all", help="val: only the model card's validation images")
    er.add_argument("--images-of", metavar="MODEL_DIR", help="with --split val: that model's validation images (compare two versions)")
    er.add_argument("--seed", type=int, default=0, help="simulator seed: image k of the split uses SEED + k (default 0)")
    er.add_argument("--limit", type=int, help="only the first N images")
    er.add_argument("--out", metavar="FILE.json", help="also write the JSON here")
    return p


def _normalise_argv(argv: list[str]) -> list[str]:
    """`napari-retina PATH` -> `napari-retina open PATH`; no arguments -> `open`."""
    if not argv:
        return ["open"]
    first = argv[0]
    if first in SUBCOMMANDS or first.startswith("-"):
        return argv
    return ["open", *argv]


def check_openable(path: Path) -> None:
    """Fail fast, before napari starts, on a path the reader cannot open."""
    from .io.datasets import open_dataset
    from .io.images import is_image_path, read_fundus

    if not path.exists():
        raise CliError(f"{path}: no such file or folder")
    if path.is_dir():
        if open_dataset(path) is None:
            raise CliError(f"{path}: no fundus images found (.jpg .jpeg .png .tif .tiff)")
        return
    if not is_image_path(path):
        raise CliError(f"{path}: not a fundus image (expected .jpg .jpeg .png .tif .tiff)")
    read_fundus(path)  # a full decode: a truncated JPEG has an intact header


OPEN_WINDOW = (1600, 1000)  # the whole fundus and the annotator dock, without scrolling


def _fit_window(viewer) -> None:
    """Size the window to OPEN_WINDOW, or to the screen where that is smaller (napari's default
    window cuts the fundus off and makes the dock scroll)."""
    from qtpy.QtWidgets import QApplication

    width, height = OPEN_WINDOW
    screen = QApplication.primaryScreen()
    if screen is not None:
        free = screen.availableGeometry()
        width, height = min(width, free.width()), min(height, free.height())
    viewer.window.resize(width, height)


def cmd_open(args) -> int:
    path = Path(args.path).expanduser() if args.path else None
    if path is not None:
        check_openable(path)
    if args.project_root:
        root = Path(args.project_root).expanduser()
        if root.exists() and not root.is_dir():
            raise CliError(f"{root}: not a folder")
    import napari

    viewer = napari.Viewer(title="napari-retina")
    _fit_window(viewer)
    _, widget = viewer.window.add_plugin_dock_widget("napari-retina", "Lesion annotator")
    if args.grader:
        widget.grader_edit.setText(args.grader)
    if args.project_root:
        widget.project_root = Path(args.project_root).expanduser()
    if path is None:
        viewer.open_sample("napari-retina", "idrid")
    elif args.project_root:
        widget.open_path(path)  # projects go under the chosen root from the first save
    else:
        viewer.open(str(path), plugin="napari-retina")
    napari.run()
    return 0


def cmd_refine(args) -> int:
    import numpy as np

    from .io.ellipses import load_ellipses
    from .io.images import read_fundus
    from .io.masks import write_mask
    from .models.refiner import EllipseRefiner

    image = Path(args.image)
    if not image.is_file():
        raise CliError(f"{image}: no such file")
    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise CliError(f"--threshold must lie between 0 and 1, not {args.threshold}")
    ef = load_ellipses(args.ellipses)
    rgb = read_fundus(image)
    out = Path(args.out)
    try:
        out.mkdir(parents=True, exist_ok=True)
    except OSError as e:
        raise CliError(f"cannot create {out}: {e.strerror or e}") from None
    refiner = EllipseRefiner(args.model)
    sp = None if args.superpixels is None else args.superpixels == "on"
    written = []
    for code in sorted({e.lesion for e in ef.ellipses}):
        ellipses = [e for e in ef.ellipses if e.lesion == code]
        mask = refiner.refine_mask(rgb, ellipses, threshold=args.threshold, superpixels=sp)
        path = out / f"{image.stem}_{code}.tif"
        write_mask(path, mask)
        written.append(f"{path} ({len(ellipses)} ellipses, {int(np.count_nonzero(mask))} px)")
    print("\n".join(written) if written else f"{args.ellipses}: no ellipses to refine")
    return 0


def _parse_reductions(values: list[str] | None) -> list[float]:
    """--reductions: absent -> the default factors; no value or 'none' -> none; else factors >= 1.0."""
    from .evaluation import DEFAULT_REDUCTIONS

    if values is None:
        return list(DEFAULT_REDUCTIONS)
    if values == [] or [v.lower() for v in values] == ["none"]:
        return []
    out = []
    for v in values:
        try:
            r = float(v)
        except ValueError:
            raise CliError(f"--reductions takes numbers >= 1.0 or 'none', not {v!r}") from None
        if not (math.isfinite(r) and r >= 1.0):
            raise CliError(f"--reductions must be at least 1.0, not {v}")
        out.append(r)
    return out


def _image_records(paths: list[str]) -> list:
    """The images named or held by folders, in order; a path that holds none is an error."""
    from .io.datasets import open_dataset, parse_prob_name
    from .io.images import is_image_path

    records = []
    for raw in paths:
        p = Path(raw).expanduser()
        if p.is_dir():
            ds = open_dataset(p)
            if ds is None:
                raise CliError(f"{p}: no fundus images found")
            records.extend(ds.records)
        elif p.is_file() and is_image_path(p) and parse_prob_name(p.name) is None:
            from ._npe2 import _record_for_image

            records.append(_record_for_image(p))
        elif not p.exists():
            raise CliError(f"{p}: no such file or folder")
        else:
            raise CliError(f"{p}: not a fundus image (expected .jpg .jpeg .png .tif .tiff)")
    return records


def cmd_segment(args) -> int:
    from .io.images import read_fundus
    from .segmentation import load_segmenter, segment_into_project, write_outputs

    if args.threshold is not None and not 0.0 < args.threshold < 1.0:
        raise CliError(f"--threshold must lie between 0 and 1, not {args.threshold}")
    records = _image_records(args.paths)
    segmenter = load_segmenter(args.lesion, args.model, device=args.device)
    if args.threshold is not None:
        segmenter.threshold = args.threshold
    out = None
    if args.out:
        out = Path(args.out)
        try:
            out.mkdir(parents=True, exist_ok=True)
        except OSError as e:
            raise CliError(f"cannot create {out}: {e.strerror or e}") from None
    failed = 0
    for k, rec in enumerate(records, 1):
        try:
            if out is not None:
                seg = segmenter.segment(read_fundus(rec.image))
                mask_path, _ = write_outputs(out, rec.stem, seg)
                line = f"{mask_path.name} {int(seg.mask.sum())} px, {seg.seconds:.1f} s"
            else:
                summary = segment_into_project(rec, segmenter, project_root=args.project_root)
                line = (f"{summary['project']}: {summary['proposed_px']} px proposed, pending until a grader "
                        f"accepts them (masks hold confirmed pixels only), {summary['seconds']:.1f} s")
            print(f"[{k}/{len(records)}] {rec.image.name}: {line}", file=sys.stderr, flush=True)
        except (RetinaInputError, OSError, RuntimeError) as e:  # one bad image (or out of memory) costs only itself
            failed += 1
            msg = str(e).splitlines()[0] if str(e) else type(e).__name__
            print(f"[{k}/{len(records)}] {rec.image.name}: error: {msg}", file=sys.stderr, flush=True)
    if failed:
        print(f"napari-retina: error: {failed} of {len(records)} images failed", file=sys.stderr)
        return EXIT_USAGE
    return 0


def _progress_line(k: int, n: int, stem: str) -> None:
    print(f"[{k}/{n}] {stem}", file=sys.stderr, flush=True)


def _print_json(result: dict, out: str | None) -> int:
    """The one JSON document of an `evaluate` command, also written to `out` (atomically)."""
    import json

    text = json.dumps(result, indent=2)
    if out:
        from .io.atomic import atomic_write_text

        atomic_write_text(out, text + "\n")
    print(text)
    return 0


def cmd_evaluate(args) -> int:
    if args.what in ("ex", "ma"):
        return _evaluate_segmenter(args, args.what.upper())
    if args.what != "refine":
        raise CliError("evaluate what? available: refine, ex, ma")
    from .evaluation import evaluate_refine

    data = Path(args.data)
    if not data.is_dir():
        raise CliError(f"{data}: not a folder")
    if not (math.isfinite(args.reduction) and args.reduction >= 1.0):
        raise CliError(f"--reduction must be at least 1.0, not {args.reduction}")
    reductions = _parse_reductions(args.reductions)
    result = evaluate_refine(
        data,
        model_dir=args.model,
        baseline_dir=args.baseline,
        reduction=args.reduction,
        reductions=reductions,
        split=args.split,
        seed=args.seed,
        limit=args.limit,
        progress=_progress_line,
        validation_images=_images_of(args),
    )
    return _print_json(result, args.out)


def _images_of(args) -> list[str] | None:
    """--images-of MODEL_DIR: the validation images its config names (one line if it names none)."""
    folder = getattr(args, "images_of", None)
    if not folder:
        return None
    from .models.registry import check_model_folder

    names = check_model_folder(Path(folder)).get("validation_images")
    if not names:
        raise CliError(f"{folder}: its config.json names no validation images")
    return list(names)


def _evaluate_segmenter(args, lesion: str) -> int:
    from .segmentation import evaluate_segmenter, load_segmenter

    data = Path(args.data)
    if not data.is_dir():
        raise CliError(f"{data}: not a folder")
    segmenter = load_segmenter(lesion, args.model, device=args.device)
    if getattr(args, "variants", False):
        from .segmentation import evaluate_variants

        result = evaluate_variants(data, segmenter, split=args.split, limit=args.limit, progress=_progress_line,
                                   validation_images=_images_of(args))
    else:
        result = evaluate_segmenter(data, segmenter, split=args.split, limit=args.limit, progress=_progress_line,
                                    validation_images=_images_of(args))
    return _print_json(result, args.out)


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_normalise_argv(argv))
    try:
        if args.command == "open":
            return cmd_open(args)
        if args.command == "refine":
            return cmd_refine(args)
        if args.command == "segment":
            return cmd_segment(args)
        if args.command == "evaluate":
            return cmd_evaluate(args)
        build_parser().print_help()
        return EXIT_USAGE
    except (CliError, RetinaInputError) as e:
        print(f"napari-retina: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
