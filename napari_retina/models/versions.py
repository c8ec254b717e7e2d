"""Model versions: the shipped models and those trained or imported here, and which one is in use.

Each trained or imported model is one folder (weights, config, card) under the user's data
folder, `<data>/models/<kind>/<version>/` (platformdirs' user data dir for "napari-retina",
or `$NAPARI_RETINA_DATA` when set), next to the shipped models, which are the first version of
each kind. `<data>/selected.json` records the version in use per kind; the annotator, the
segmenters and the CLI load `current_model_dir(kind)` (`load_model_in_use(kind)`) when no
folder is given. A folder whose checksum fails is never selected (the registry refuses it
with one line), and selecting a new version never removes the previous one. Versions build on
the registry (models.registry), which knows only the shipped models and never imports this.

platformdirs is imported lazily (the GPU machine that runs `python -m training` lacks it).
"""

from __future__ import annotations

import json
import os
import re
import shutil
from dataclasses import dataclass
from pathlib import Path

from ..io.atomic import atomic_write_text
from .registry import KINDS, ModelFolderError, check_model_folder, load_model, shipped_model_dir

ENV = "NAPARI_RETINA_DATA"


def data_root() -> Path:
    """The user's napari-retina data folder (created on first use)."""
    env = os.environ.get(ENV)
    if env:
        root = Path(env)
    else:
        import platformdirs

        root = Path(platformdirs.user_data_dir("napari-retina", appauthor=False))
    return root


def models_root(kind: str) -> Path:
    if kind not in KINDS:
        raise ModelFolderError(f"unknown model {kind!r}; known: {', '.join(sorted(KINDS))}")
    return data_root() / "models" / kind


@dataclass(frozen=True)
class Version:
    kind: str
    folder: Path
    version: str
    shipped: bool
    figures: dict  # the validation figures its config records (training.*val*)
    parent: str | None  # the parent's version (config.json records it with its checksum)

    @property
    def label(self) -> str:
        figs = ", ".join(f"{k.replace('val_', '')} {v}" for k, v in self.figures.items())
        return f"{self.version}{' (shipped)' if self.shipped else ''}{': ' + figs if figs else ''}"


def _version_of(kind: str, folder: Path, shipped: bool) -> Version | None:
    try:
        config = json.loads((folder / "config.json").read_text(encoding="utf-8"))
    except (OSError, ValueError):
        return None
    if not isinstance(config, dict) or config.get("model") != kind:
        return None
    training = config.get("training", {}) if isinstance(config.get("training"), dict) else {}
    figures = {k: v for k, v in training.items() if "val" in k and isinstance(v, (int, float))}
    parent = training.get("parent")
    if isinstance(parent, dict):
        parent = parent.get("version")
    return Version(kind, folder, str(config.get("version", folder.name)), shipped, figures,
                   None if parent is None else str(parent))


def versions(kind: str) -> list[Version]:
    """The shipped version (if any), then the versions trained or imported here, oldest first."""
    out = []
    shipped = shipped_model_dir(kind)
    if shipped.is_dir():
        v = _version_of(kind, shipped, True)
        if v is not None:
            out.append(v)
    root = models_root(kind)
    if root.is_dir():
        found = [v for d in root.iterdir() if d.is_dir() and (v := _version_of(kind, d, False)) is not None]
        out += sorted(found, key=lambda v: (v.folder.stat().st_mtime, v.folder.name))
    return out


def _settings_path() -> Path:
    return data_root() / "selected.json"


def _settings() -> dict:
    try:
        obj = json.loads(_settings_path().read_text(encoding="utf-8"))
        return obj if isinstance(obj, dict) else {}
    except (OSError, ValueError):
        return {}


def current_model_dir(kind: str) -> Path:
    """The folder of the version in use: the one selected, if it is still there, else the shipped one."""
    chosen = _settings().get("selected", {}).get(kind)
    if chosen and (Path(chosen) / "config.json").is_file():
        return Path(chosen)
    return shipped_model_dir(kind)


def load_model_in_use(kind: str, device: str = "cpu", **kw):
    """The inference object of the version of `kind` in use (`current_model_dir`), checked."""
    return load_model(current_model_dir(kind), expect=kind, device=device, **kw)


def select(kind: str, folder: str | Path) -> Path:
    """Use `folder` (checked: kind and checksum) for `kind` from now on; returns it."""
    folder = Path(folder).resolve()
    check_model_folder(folder, expect=kind)
    settings = _settings()
    settings.setdefault("selected", {})[kind] = str(folder)
    _settings_path().parent.mkdir(parents=True, exist_ok=True)
    atomic_write_text(_settings_path(), json.dumps(settings, indent=1) + "\n")
    return folder


def new_version_dir(kind: str, version: str) -> Path:
    """A fresh folder name for a version about to be trained (never an existing one)."""
    safe = re.sub(r"[^A-Za-z0-9._-]+", "-", version).strip("-") or "model"
    root = models_root(kind)
    root.mkdir(parents=True, exist_ok=True)
    folder, k = root / safe, 2
    while folder.exists():
        folder, k = root / f"{safe}-{k}", k + 1
    return folder


def import_model(folder: str | Path) -> Path:
    """Copy a model folder trained elsewhere into the versions (after its checksum, and once its
    weights have loaded into the network its config names); returns the copy."""
    folder = Path(folder)
    config = check_model_folder(folder)
    target = new_version_dir(config["model"], str(config.get("version", folder.name)))
    shutil.copytree(folder, target, ignore=shutil.ignore_patterns("run", "*.pt"))
    try:
        # a quick validation: the copy passes its checksum and its weights build the network it names
        load_model(target, expect=config["model"])
    except Exception as e:
        shutil.rmtree(target, ignore_errors=True)
        msg = str(e).splitlines()[0] if str(e) else type(e).__name__
        raise ModelFolderError(f"{folder}: {msg}") from None
    return target
