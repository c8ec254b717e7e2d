"""The command-line wrapper every recipe shares: parse, check, run, one-line errors (exit 2)."""

from __future__ import annotations

import sys
from typing import Callable

from napari_retina.io.errors import RetinaInputError

from ..data import DataError


def recipe_main(name: str, build_parser: Callable, validate: Callable, run: Callable, argv: list[str] | None) -> int:
    """`python -m training <name> ...`: a user's mistake prints one line and exits with code 2."""
    argv = list(sys.argv[1:] if argv is None else argv)
    p = build_parser()
    a = p.parse_args(argv)
    validate(p, a)
    try:
        return run(a, argv)
    except (RetinaInputError, DataError, OSError) as e:
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        print(f"training {name}: error: {msg}", file=sys.stderr)
        return 2
    except KeyboardInterrupt:
        print(f"training {name}: interrupted; resume with --resume", file=sys.stderr)
        return 130
