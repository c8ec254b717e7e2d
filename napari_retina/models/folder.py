"""The model folder format: weights.safetensors (<= 15 MiB), config.json, card.md.

One definition for every model (refiner, exudates, microaneurysms): training
writes it, inference and the card reader load it. torch is imported lazily.
"""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

from ..io.atomic import atomic_path, atomic_write_text
from ..io.errors import RetinaInputError

MAX_WEIGHTS_BYTES = 15 * 1024 * 1024
WEIGHTS = "weights.safetensors"
CONFIG = "config.json"
CARD = "card.md"


def sha256_of(path: Path) -> str:
    h = hashlib.sha256()
    with open(path, "rb") as f:
        for chunk in iter(lambda: f.read(1 << 20), b""):
            h.update(chunk)
    return h.hexdigest()


def save_state_dict(path: Path, state: dict, half: bool | None = None) -> bool:
    """Write tensors as safetensors; half precision when asked or when needed to fit 15 MiB."""
    import torch
    from safetensors.torch import save_file

    tensors = {k: v.detach().to("cpu").contiguous() for k, v in state.items()}
    size = sum(t.numel() * t.element_size() for t in tensors.values())
    if half is None:
        half = size > MAX_WEIGHTS_BYTES * 0.95
    if half:
        tensors = {k: (t.half() if t.is_floating_point() else t) for k, t in tensors.items()}
    with atomic_path(path) as tmp:
        save_file(tensors, str(tmp))
    if path.stat().st_size > MAX_WEIGHTS_BYTES:
        raise RetinaInputError(f"{path}: {path.stat().st_size / 2**20:.1f} MiB is over the 15 MiB limit")
    _ = torch  # torch must be importable for safetensors.torch
    return half


def write_model_folder(folder: Path, state: dict, config: dict, card: str, half: bool | None = None) -> Path:
    folder = Path(folder)
    folder.mkdir(parents=True, exist_ok=True)
    half = save_state_dict(folder / WEIGHTS, state, half=half)
    config = dict(config, weights_dtype="float16" if half else "float32", weights_sha256=sha256_of(folder / WEIGHTS))
    atomic_write_text(folder / CONFIG, json.dumps(config, indent=2) + "\n")
    atomic_write_text(folder / CARD, card.replace("{sha256}", config["weights_sha256"]))
    return folder


def read_config(folder: Path) -> dict:
    folder = Path(folder)
    p = folder / CONFIG
    if not (folder / WEIGHTS).is_file() or not p.is_file():
        raise RetinaInputError(f"{folder}: not a model folder (needs {WEIGHTS} and {CONFIG})")
    try:
        return json.loads(p.read_text())
    except (OSError, json.JSONDecodeError) as e:
        raise RetinaInputError(f"{p}: unreadable ({e})") from None


def load_state_dict(folder: Path) -> dict:
    """The weights as float32 tensors (they may be stored in half precision)."""
    from safetensors.torch import load_file

    try:
        tensors = load_file(str(Path(folder) / WEIGHTS))
    except Exception as e:  # safetensors raises its own error types for damaged files
        raise RetinaInputError(f"{folder}: damaged weights ({e})") from None
    return {k: (v.float() if v.is_floating_point() else v) for k, v in tensors.items()}
