"""One registry of napari-retina's models: a model folder loads by the `model` its config.json names.

Every model folder (models.folder: weights.safetensors, config.json, card.md) is checked
before its weights are used: the `model` is one this version knows, the weights are at
most 15 MiB and their SHA-256 is the one config.json (and the card, where it states one)
records. A folder that fails is refused with one message that names it and says why;
a half-copied or edited folder never silently runs.

    load_model("path/to/folder")                  # -> the model's inference object
    load_model(None, expect="refiner")            # -> the shipped refiner
    versions.load_model_in_use("refiner")         # -> the refiner version in use (selected or shipped)
    check_model_folder(folder, expect="refiner")  # -> config.json as a dict, or RetinaInputError

Kinds register by import path, so nothing here imports torch or a network until a folder
of that kind is loaded. Later kinds (exudates, microaneurysm networks) add one line each.
"""

from __future__ import annotations

import importlib
import re
from pathlib import Path
from typing import Any

from ..io.errors import RetinaInputError
from .folder import CARD, CONFIG, MAX_WEIGHTS_BYTES, WEIGHTS, read_config, sha256_of

# model name in config.json -> "module:Class" whose `from_folder(folder, config, device=..., **kw)` loads it
KINDS: dict[str, str] = {
    "refiner": "napari_retina.models.refiner:EllipseRefiner",
    "exudates": "napari_retina.models.segmenter:LesionSegmenter",
    "ma-hgn": "napari_retina.models.segmenter:LesionSegmenter",
    "ma-prn": "napari_retina.models.microaneurysms:PatchScorer",
    "microaneurysms": "napari_retina.models.microaneurysms:MicroaneurysmDetector",
}

SHIPPED_DIR = Path(__file__).resolve().parent / "weights"

_CARD_SHA = re.compile(r"SHA-256:\s*([0-9a-f]{64})", re.IGNORECASE)


class ModelFolderError(RetinaInputError):
    """A model folder that cannot be used (its message is the one line a user sees)."""


def shipped_model_dir(kind: str) -> Path:
    """The folder of the model shipped with napari-retina for `kind` (e.g. "refiner")."""
    if kind not in KINDS:
        raise ModelFolderError(f"unknown model {kind!r}; known: {', '.join(sorted(KINDS))}")
    return SHIPPED_DIR / kind


def check_model_folder(folder: str | Path, expect: str | None = None) -> dict:
    """config.json of a usable model folder; ModelFolderError (one line) for anything else."""
    folder = Path(folder)
    if not folder.is_dir():
        raise ModelFolderError(f"{folder}: no such model folder")
    try:
        config = read_config(folder)
    except RetinaInputError as e:
        raise ModelFolderError(str(e)) from None
    if not isinstance(config, dict):
        raise ModelFolderError(f"{folder / CONFIG}: not a JSON object")
    kind = config.get("model")
    if kind not in KINDS:
        raise ModelFolderError(
            f"{folder}: config.json names model {kind!r}, which this napari-retina does not know "
            f"(known: {', '.join(sorted(KINDS))})"
        )
    if expect is not None and kind != expect:
        raise ModelFolderError(f"{folder}: a {kind} model, not a {expect} model")
    weights = folder / WEIGHTS
    size = weights.stat().st_size
    if size > MAX_WEIGHTS_BYTES:
        raise ModelFolderError(f"{weights}: {size / 2**20:.1f} MiB is over the 15 MiB limit of a model folder")
    want = config.get("weights_sha256")
    if not want:
        raise ModelFolderError(f"{folder}: config.json records no weights_sha256, so the weights cannot be checked")
    got = sha256_of(weights)
    if got != want:
        raise ModelFolderError(
            f"{weights}: checksum {got[:12]}... does not match config.json ({str(want)[:12]}...): "
            "the folder was changed or copied incompletely"
        )
    card = folder / CARD
    if card.is_file():
        stated = _CARD_SHA.search(card.read_text(errors="replace"))
        if stated and stated.group(1).lower() != got:
            raise ModelFolderError(f"{card}: states checksum {stated.group(1)[:12]}..., the weights have {got[:12]}...")
    return config


def model_class(kind: str):
    """The inference class registered for `kind` (imported now)."""
    if kind not in KINDS:
        raise ModelFolderError(f"unknown model {kind!r}; known: {', '.join(sorted(KINDS))}")
    module, _, name = KINDS[kind].partition(":")
    return getattr(importlib.import_module(module), name)


def load_model(folder: str | Path | None = None, expect: str | None = None, device: str = "cpu", **kw: Any):
    """The inference object of a checked model folder (None: the shipped model of `expect`).

    The registry knows the shipped models only; the version a grader selected is
    versions.load_model_in_use(kind) (versions builds on the registry, never the reverse)."""
    if folder is None:
        if expect is None:
            raise ModelFolderError("give a model folder or the kind of shipped model to load")
        folder = shipped_model_dir(expect)
    config = check_model_folder(folder, expect=expect)
    return model_class(config["model"]).from_folder(Path(folder), config, device=device, **kw)
