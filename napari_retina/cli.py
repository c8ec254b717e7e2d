"""Command line: `napari-retina open PATH` (a bare PATH means the same).

With no arguments it opens the shipped IDRiD sample. Errors a user can cause
print one line and exit with code 2. napari is imported only by `open`, so
headless subcommands start fast on machines without a display.
"""

from __future__ import annotations

import argparse
import sys
from pathlib import Path

from . import __version__
from .io.errors import RetinaInputError

SUBCOMMANDS = ("open",)
EXIT_USAGE = 2


class CliError(Exception):
    """A one-line message for the user; exit code 2."""


class _Parser(argparse.ArgumentParser):
    def error(self, message):  # one line, exit code 2 (argparse's own code), no usage dump
        self.exit(EXIT_USAGE, f"napari-retina: error: {message}\n")


def build_parser() -> argparse.ArgumentParser:
    p = _Parser(
        prog="napari-retina",
        description="Lesion annotation of colour fundus photographs in napari (IDRiD convention).",
        epilog="A bare PATH means `open PATH`; no arguments open the IDRiD sample.",
    )
    p.add_argument("--version", action="version", version=f"napari-retina {__version__}")
    sub = p.add_subparsers(dest="command", metavar="{open}")
    o = sub.add_parser(
        "open",
        help="open a fundus image, an IDRiD-layout folder or an annotation project in napari",
        description="Open PATH in napari with the lesion annotator docked.",
    )
    o.add_argument("path", nargs="?", help="image (.jpg .png .tif), folder or <stem>.retina project; default: IDRiD sample")
    o.add_argument("--project-root", metavar="DIR", help="save annotation projects under DIR instead of beside the images")
    o.add_argument("--grader", metavar="NAME", help="grader name recorded in provenance.json")
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


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    args = build_parser().parse_args(_normalise_argv(argv))
    try:
        if args.command == "open":
            return cmd_open(args)
        build_parser().print_help()
        return EXIT_USAGE
    except (CliError, RetinaInputError) as e:
        print(f"napari-retina: error: {e}", file=sys.stderr)
        return EXIT_USAGE


if __name__ == "__main__":
    sys.exit(main())
