"""python -m training <model> ...: retrain one of napari-retina's models.

Recipes are modules of `training.recipes` with a `main(argv)`; a model name with a hyphen
(`ma-hgn`) is the module with an underscore (`ma_hgn`).
"""

from __future__ import annotations

import time

STARTED = time.monotonic()  # before anything heavy is imported

import importlib  # noqa: E402
import pkgutil  # noqa: E402
import sys  # noqa: E402

from . import recipes


def available() -> list[str]:
    """Model names as typed (`ma-hgn` is the module `ma_hgn`)."""
    return sorted(m.name.replace("_", "-") for m in pkgutil.iter_modules(recipes.__path__) if not m.name.startswith("_"))


def main(argv: list[str] | None = None) -> int:
    argv = list(sys.argv[1:] if argv is None else argv)
    models = available()
    if not argv or argv[0] in ("-h", "--help"):
        print("usage: python -m training <model> [options]")
        print("models: " + (", ".join(models) if models else "(none installed yet)"))
        return 0 if argv else 2
    name = argv[0]
    if name not in models:
        print(f"training: error: unknown model {name!r}; available: {', '.join(models) or 'none'}", file=sys.stderr)
        return 2
    from .recipes import _main as runner

    # a --minutes budget counts the recipe's imports and data preparation too
    runner.RUN_STARTED = STARTED if __name__ == "__main__" else time.monotonic()
    return int(importlib.import_module(f"training.recipes.{name.replace('-', '_')}").main(argv[1:]) or 0)


if __name__ == "__main__":
    sys.exit(main())
