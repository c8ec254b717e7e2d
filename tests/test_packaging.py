"""The distribution as napari and pip see it: wheel contents, manifest, entry points.

The wheel is built once per module from a copy of the files git would commit
(so stale build/ folders or untracked clutter in the checkout cannot leak in),
without build isolation: setuptools and wheel come from the venv, which keeps
it offline and takes a few seconds.
"""

from __future__ import annotations

import configparser
import importlib
import os
import shutil
import subprocess
import sys
import zipfile
from pathlib import Path

import pytest
import yaml

ROOT = Path(__file__).resolve().parents[1]
MANIFEST = ROOT / "napari_retina" / "napari.yaml"
DIST = "napari-retina"
BUILD_TIMEOUT_S = 120  # it takes ~5 s; a hang fails here instead of at CI's limit

# paths a wheel must never carry (top-level folders of the checkout that are not packages)
NOT_IN_WHEEL = ("tests/", ".venv/", "benchmarks/", "scripts/", ".ci/", ".git/", "build/")


def _source_files() -> list[str]:
    """Paths (relative to ROOT) that a clean clone would have: tracked + untracked-not-ignored."""
    try:
        out = subprocess.run(
            ["git", "ls-files", "-z", "--cached", "--others", "--exclude-standard"],
            cwd=ROOT, capture_output=True, check=True, timeout=60,
        ).stdout
    except (OSError, subprocess.CalledProcessError):
        return []
    return [p for p in out.decode().split("\0") if p]


def _copy_source(dest: Path) -> None:
    files = _source_files()
    if not files:  # not a git checkout (an unpacked sdist): copy minus the usual clutter
        shutil.copytree(
            ROOT, dest, symlinks=True,
            ignore=shutil.ignore_patterns(".venv", ".git", "build", "dist", "*.egg-info", "__pycache__"),
        )
        return
    for rel in files:
        src = ROOT / rel
        if not os.path.lexists(src):  # deleted in the work tree but still in the index
            continue
        target = dest / rel
        target.parent.mkdir(parents=True, exist_ok=True)
        if src.is_symlink():
            os.symlink(os.readlink(src), target)
        else:
            shutil.copy2(src, target)


@pytest.fixture(scope="module")
def wheel(tmp_path_factory) -> zipfile.ZipFile:
    tmp = tmp_path_factory.mktemp("wheel")
    src, out = tmp / "src", tmp / "dist"
    _copy_source(src)
    proc = subprocess.run(
        [sys.executable, "-m", "build", "--wheel", "--no-isolation", "-o", str(out), str(src)],
        capture_output=True, text=True, timeout=BUILD_TIMEOUT_S,
    )
    assert proc.returncode == 0, f"wheel build failed:\n{proc.stdout[-3000:]}\n{proc.stderr[-3000:]}"
    wheels = list(out.glob("*.whl"))
    assert len(wheels) == 1, f"expected one wheel, got {wheels}"
    with zipfile.ZipFile(wheels[0]) as zf:
        yield zf


def _dist_info_file(zf: zipfile.ZipFile, name: str) -> str:
    hits = [n for n in zf.namelist() if n.count("/") == 1 and n.endswith(f".dist-info/{name}")]
    assert len(hits) == 1, f"{name} in dist-info: {hits}"
    return zf.read(hits[0]).decode()


def test_wheel_carries_the_manifest(wheel):
    assert "napari_retina/napari.yaml" in wheel.namelist()
    manifest = yaml.safe_load(wheel.read("napari_retina/napari.yaml"))
    assert manifest["name"] == DIST
    # the same bytes as the checkout's manifest, not a stale copy
    assert wheel.read("napari_retina/napari.yaml") == MANIFEST.read_bytes()


def test_wheel_entry_points(wheel):
    eps = configparser.ConfigParser()
    eps.optionxform = str  # keep names case-sensitive
    eps.read_string(_dist_info_file(wheel, "entry_points.txt"))
    assert dict(eps["napari.manifest"]) == {DIST: "napari_retina:napari.yaml"}
    assert eps["console_scripts"]["napari-retina"] == "napari_retina.cli:main"


def test_wheel_carries_both_packages_and_the_sample(wheel):
    names = wheel.namelist()
    assert "napari_retina/__init__.py" in names
    assert "training/__init__.py" in names
    samples = [n for n in names if n.startswith("napari_retina/samples/")]
    assert "napari_retina/samples/ATTRIBUTION.md" in samples, f"samples in wheel: {samples}"
    assert any(n.lower().endswith(".jpg") for n in samples), f"no .jpg sample in wheel: {samples}"


def test_wheel_carries_nothing_else(wheel):
    names = wheel.namelist()
    leaked = [n for n in names if n.startswith(NOT_IN_WHEEL) or "/.venv/" in n]
    assert not leaked, f"wheel carries files that are not part of the packages: {leaked[:20]}"
    top = {n.split("/", 1)[0] for n in names}
    extra = {t for t in top if not t.endswith(".dist-info")} - {"napari_retina", "training"}
    assert not extra, f"unexpected top-level entries in wheel: {sorted(extra)}"
    compiled = [n for n in names if n.endswith((".pyc", ".pyo")) or "__pycache__" in n]
    assert not compiled, f"compiled files in wheel: {compiled[:20]}"


def test_root_manifest_is_a_symlink_to_the_package_manifest():
    link = ROOT / "napari.yaml"
    assert link.is_symlink(), "napari.yaml at the repo root must be a symlink (one manifest only)"
    # relative, so it still points at the right file in any clone
    assert not os.path.isabs(os.readlink(link))
    assert link.samefile(MANIFEST)


def test_manifest_validates_with_npe2():
    from npe2 import PluginManifest

    pm = PluginManifest.from_file(MANIFEST)  # raises ValidationError on a schema error
    assert pm.name == DIST
    commands = {c.id for c in pm.contributions.commands}
    # every reader/writer/sample/widget names a declared command
    used = (
        [r.command for r in pm.contributions.readers or []]
        + [w.command for w in pm.contributions.writers or []]
        + [s.command for s in pm.contributions.sample_data or [] if hasattr(s, "command")]
        + [w.command for w in pm.contributions.widgets or []]
    )
    assert used and set(used) <= commands, f"undeclared commands: {set(used) - commands}"


def test_npe2_validate_cli_finds_the_installed_plugin():
    # by distribution name: this goes through the napari.manifest entry point of the install
    proc = subprocess.run(
        [sys.executable, "-m", "npe2", "validate", DIST],
        capture_output=True, text=True, timeout=120, cwd=ROOT,
    )
    assert proc.returncode == 0, f"npe2 validate {DIST} failed:\n{proc.stdout}\n{proc.stderr}"
    assert "valid" in proc.stdout.lower()


def _python_names() -> list[str]:
    manifest = yaml.safe_load(MANIFEST.read_text())
    return [c["python_name"] for c in manifest["contributions"]["commands"]]


@pytest.mark.parametrize("python_name", _python_names())
def test_python_name_resolves(python_name):
    module_name, _, attr_path = python_name.partition(":")
    assert attr_path, f"{python_name!r} is not 'module:attribute'"
    obj = importlib.import_module(module_name)
    for attr in attr_path.split("."):
        obj = getattr(obj, attr)
    assert callable(obj), f"{python_name} is not callable"


def test_wheel_carries_the_shipped_refinement_model(wheel):
    names = wheel.namelist()
    for f in ("weights.safetensors", "config.json", "card.md"):
        assert f"napari_retina/models/weights/refiner/{f}" in names
    info = wheel.getinfo("napari_retina/models/weights/refiner/weights.safetensors")
    assert info.file_size <= 15 * 2**20
    assert not [n for n in names if "/run/" in n or n.endswith(".pt")], "training checkpoints leaked into the wheel"
