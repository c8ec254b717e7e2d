"""The core runs without a GUI and without torch until a model is needed.

Only napari_retina/widgets/ may use Qt or napari (GUIDE.md). The CLI, training
and the tests import everything else on machines that have no napari or Qt at
all (the GPU machine), so:

* at run time, every module of napari_retina outside widgets/ (and the
  training package) imports in a fresh interpreter whose import system refuses
  napari/Qt/magicgui/superqt/vispy, and importing them all leaves torch
  unimported, the torch.nn network definitions (nets/) aside (torch is imported
  lazily, so napari starts fast);
* statically, no module-level import of a GUI package appears outside
  napari_retina/widgets/, only the libraries the GPU machine has are imported
  at module level by the headless core and training, and napari_retina never
  imports training.
"""

from __future__ import annotations

import ast
import json
import subprocess
import sys
from pathlib import Path

import pytest

ROOT = Path(__file__).resolve().parents[1]

# must exist and import headless; a missing one fails the test
REQUIRED_HEADLESS = [
    "napari_retina",
    "napari_retina.lesions",
    "napari_retina.io",
    "napari_retina.io.images",
    "napari_retina.io.masks",
    "napari_retina.io.ellipses",
    "napari_retina.io.project",
    "napari_retina.io.datasets",
    "napari_retina.fundus",
    "napari_retina.models.preprocess",
    "napari_retina.models.registry",
    "napari_retina.models.versions",
    "napari_retina.session",
    "napari_retina.cli",
    "training",
]
# the network definitions are torch.nn by design: headless, but they import torch
TORCH_PACKAGES = ("napari_retina.nets",)


def _core_modules() -> list[str]:
    """Every napari_retina module outside widgets/ (the core and the npe2 entry points)."""
    pkg = ROOT / "napari_retina"
    names = []
    for path in sorted(pkg.rglob("*.py")):
        parts = list(path.relative_to(ROOT).with_suffix("").parts)
        if parts[1:2] == ["widgets"] or parts[-1] == "__main__":
            continue
        names.append(".".join(parts[:-1] if parts[-1] == "__init__" else parts))
    return names


def _uses_torch(module: str) -> bool:
    return any(module == p or module.startswith(p + ".") for p in TORCH_PACKAGES)


# the probe tells which module first loads torch, so the torch users come last
HEADLESS_MODULES = sorted(set(REQUIRED_HEADLESS) | set(_core_modules()), key=lambda m: (_uses_torch(m), m))

GUI_PACKAGES = [
    "napari", "qtpy", "PyQt5", "PyQt6", "PySide2", "PySide6", "magicgui", "superqt", "vispy",
]

# third-party packages on the GPU machine (GUIDE.md); the headless core and training
# import only these at module level (anything else lazily, inside the function needing it)
GPU_MACHINE_PACKAGES = {
    "numpy", "scipy", "skimage", "sklearn", "cv2", "PIL", "tifffile", "safetensors", "torch",
}
PROJECT_PACKAGES = {"napari_retina", "training"}

# runs in a fresh interpreter: imports each module, reports per module as JSON on the last line
_PROBE = r"""
import importlib, importlib.abc, json, sys, traceback

modules, blocked = json.loads(sys.argv[1]), set(json.loads(sys.argv[2]))
refused = []

class RefuseGui(importlib.abc.MetaPathFinder):
    def find_spec(self, name, path=None, target=None):
        if name.partition(".")[0] in blocked:
            refused.append(name)
            raise ModuleNotFoundError(f"{name} is blocked: this import must work without a GUI", name=name)
        return None

sys.meta_path.insert(0, RefuseGui())

harness_ok = True
if blocked:  # the blocker itself must work, or the test proves nothing
    try:
        import qtpy  # noqa: F401
        harness_ok = False
    except ImportError:
        pass

report = {}
for name in modules:
    before = set(sys.modules)
    try:
        importlib.import_module(name)
        error = None
    except BaseException:
        error = traceback.format_exc(limit=-6)
    report[name] = {"error": error, "torch": "torch" in sys.modules and "torch" not in before}
gui_loaded = sorted(m for m in sys.modules if m.partition(".")[0] in blocked)
print(json.dumps({"harness_ok": harness_ok, "report": report, "gui_loaded": gui_loaded}))
"""


def _probe(blocked: list[str]) -> dict:
    proc = subprocess.run(
        [sys.executable, "-c", _PROBE, json.dumps(HEADLESS_MODULES), json.dumps(blocked)],
        capture_output=True, text=True, timeout=180, cwd=ROOT,
    )
    assert proc.returncode == 0, f"probe crashed:\n{proc.stdout}\n{proc.stderr}"
    return json.loads(proc.stdout.strip().splitlines()[-1])


@pytest.fixture(scope="module")
def without_gui() -> dict:
    result = _probe(GUI_PACKAGES)
    assert result["harness_ok"], "the import blocker did not block qtpy"
    return result


@pytest.fixture(scope="module")
def with_everything() -> dict:
    return _probe([])


@pytest.mark.parametrize("module", HEADLESS_MODULES)
def test_module_imports_without_gui(without_gui, module):
    error = without_gui["report"][module]["error"]
    assert error is None, f"import {module} failed with napari/Qt unavailable:\n{error}"


def test_no_gui_module_loaded(without_gui):
    assert without_gui["gui_loaded"] == []


def test_headless_imports_do_not_import_torch(with_everything):
    report = with_everything["report"]
    culprits = [m for m, r in report.items() if r["torch"] and not _uses_torch(m)]
    assert not culprits, (
        f"importing {culprits} imports torch (the first listed may pull it in for the rest); "
        "import torch inside the function that needs it"
    )
    failed = {m: r["error"] for m, r in report.items() if r["error"]}
    assert not failed, f"modules that do not import at all: {sorted(failed)}\n" + "\n".join(failed.values())


# ---- static checks ---------------------------------------------------------------------------


def _is_type_checking(test: ast.expr) -> bool:
    return (isinstance(test, ast.Name) and test.id == "TYPE_CHECKING") or (
        isinstance(test, ast.Attribute) and test.attr == "TYPE_CHECKING"
    )


def _imports(tree: ast.Module, module_level_only: bool) -> list[tuple[int, str]]:
    """(line, top-level package) of absolute imports; module level = run at import time."""
    found: list[tuple[int, str]] = []

    def visit(node: ast.AST) -> None:
        for child in ast.iter_child_nodes(node):
            if module_level_only and isinstance(child, (ast.FunctionDef, ast.AsyncFunctionDef, ast.Lambda)):
                continue
            if module_level_only and isinstance(child, ast.If) and _is_type_checking(child.test):
                for orelse in child.orelse:
                    visit_stmt(orelse)
                continue
            visit_stmt(child)

    def visit_stmt(node: ast.AST) -> None:
        if isinstance(node, ast.Import):
            found.extend((node.lineno, a.name.partition(".")[0]) for a in node.names)
        elif isinstance(node, ast.ImportFrom) and node.level == 0 and node.module:
            found.append((node.lineno, node.module.partition(".")[0]))
        visit(node)

    visit(tree)
    return found


def _py_files(package: str) -> list[Path]:
    files = sorted((ROOT / package).rglob("*.py"))
    assert files, f"no .py files under {package}/"
    return files


def _rel(path: Path) -> str:
    return path.relative_to(ROOT).as_posix()


def _parse(path: Path) -> ast.Module:
    return ast.parse(path.read_text(encoding="utf-8"), filename=str(path))


def _is_gui_side(path: Path) -> bool:
    return _rel(path).startswith("napari_retina/widgets/")


def test_no_module_level_gui_import_outside_widgets():
    gui = set(GUI_PACKAGES)
    offenders = [
        f"{_rel(p)}:{line} imports {pkg}"
        for p in _py_files("napari_retina") + _py_files("training")
        if not _is_gui_side(p)
        for line, pkg in _imports(_parse(p), module_level_only=True)
        if pkg in gui
    ]
    assert not offenders, "GUI imported at module level outside napari_retina/widgets/:\n" + "\n".join(offenders)


def test_no_gui_import_anywhere_in_training():
    gui = set(GUI_PACKAGES)
    offenders = [
        f"{_rel(p)}:{line} imports {pkg}"
        for p in _py_files("training")
        for line, pkg in _imports(_parse(p), module_level_only=False)
        if pkg in gui
    ]
    assert not offenders, "training must run without napari/Qt:\n" + "\n".join(offenders)


def test_core_imports_only_what_the_gpu_machine_has():
    allowed = set(sys.stdlib_module_names) | GPU_MACHINE_PACKAGES | PROJECT_PACKAGES | {"__future__"}
    offenders = [
        f"{_rel(p)}:{line} imports {pkg}"
        for p in _py_files("napari_retina") + _py_files("training")
        # widgets/ and the npe2 entry points only ever run inside napari
        if not _is_gui_side(p) and _rel(p) != "napari_retina/_npe2.py"
        for line, pkg in _imports(_parse(p), module_level_only=True)
        if pkg not in allowed
    ]
    assert not offenders, (
        "module-level imports of packages the GPU machine lacks (import them inside the function):\n"
        + "\n".join(offenders)
    )


def test_napari_retina_never_imports_training():
    offenders = [
        f"{_rel(p)}:{line}"
        for p in _py_files("napari_retina")
        for line, pkg in _imports(_parse(p), module_level_only=False)
        if pkg == "training"
    ]
    assert not offenders, "napari_retina imports training (start `python -m training` instead):\n" + "\n".join(offenders)


def test_static_checker_sees_module_level_imports_only():
    # the checker itself: what runs at import time counts, function bodies and TYPE_CHECKING do not
    tree = ast.parse(
        "import os\n"
        "from typing import TYPE_CHECKING\n"
        "try:\n    import qtpy.QtCore\nexcept ImportError:\n    pass\n"
        "if TYPE_CHECKING:\n    import napari\n"
        "class A:\n    from magicgui import magicgui\n"
        "def f():\n    import torch\n"
        "from . import sibling\n"
    )
    assert [pkg for _, pkg in _imports(tree, module_level_only=True)] == ["os", "typing", "qtpy", "magicgui"]
    assert [pkg for _, pkg in _imports(tree, module_level_only=False)] == [
        "os", "typing", "qtpy", "napari", "magicgui", "torch",
    ]
