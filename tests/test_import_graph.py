"""The import graph of napari_retina and training has no cycle, and no dock imports another dock.

The graph is read statically with `ast`: every import counts, at module level, inside
functions and under `if TYPE_CHECKING:` alike (a lazy import still ties the two modules
together, it only moves the failure to run time). Relative imports are resolved; an import
names the most specific module of the two packages it reaches (`from .registry import
load_model` -> `...models.registry`, `from . import lesions` -> `napari_retina.lesions`).
Imports made from strings (`importlib.import_module`, the registry's KINDS) are not seen.

Whether the core stays free of Qt, napari and torch is tests/test_headless.py's job.
"""

from __future__ import annotations

import ast
from collections import deque
from pathlib import Path

import yaml

ROOT = Path(__file__).resolve().parents[1]
PACKAGES = ("napari_retina", "training")
MANIFEST = ROOT / "napari_retina" / "napari.yaml"


def module_files(root: Path, packages) -> dict[str, Path]:
    """Dotted module name -> file, for every .py file of `packages` under `root`."""
    found: dict[str, Path] = {}
    for package in packages:
        for path in sorted((root / package).rglob("*.py")):
            parts = list(path.relative_to(root).with_suffix("").parts)
            if parts[-1] == "__init__":
                parts.pop()
            found[".".join(parts)] = path
    return found


def _resolve(name: str, modules) -> str | None:
    """The longest prefix of dotted `name` that is one of `modules` (None: outside them)."""
    parts = name.split(".")
    for n in range(len(parts), 0, -1):
        candidate = ".".join(parts[:n])
        if candidate in modules:
            return candidate
    return None


def imports_of(module: str, path: Path, modules) -> set[str]:
    """The modules among `modules` that `module` (source at `path`) imports anywhere in its code."""
    tree = ast.parse(path.read_text(encoding="utf-8"), filename=str(path))
    is_package = path.name == "__init__.py"
    found: set[str] = set()
    for node in ast.walk(tree):  # every statement: module level, functions, TYPE_CHECKING blocks
        if isinstance(node, ast.Import):
            names = [a.name for a in node.names]
        elif isinstance(node, ast.ImportFrom):
            if node.level:
                base = module.split(".") if is_package else module.split(".")[:-1]
                if node.level - 1 > len(base):
                    raise ValueError(f"{path}:{node.lineno}: relative import beyond the top-level package")
                base = base[: len(base) - (node.level - 1)]
                source = ".".join(base + ([node.module] if node.module else []))
            else:
                source = node.module or ""
            # `from pkg import name`: the submodule pkg.name where there is one, else pkg itself
            names = [f"{source}.{a.name}" if a.name != "*" else source for a in node.names]
        else:
            continue
        for name in names:
            target = _resolve(name, modules)
            if target is not None and target != module:
                found.add(target)
    return found


def import_graph(root: Path = ROOT, packages=PACKAGES) -> dict[str, set[str]]:
    """Module -> the modules (of `packages`) it imports."""
    files = module_files(root, packages)
    return {m: imports_of(m, p, files) for m, p in files.items()}


def _path(graph, start: str, goal: str, within=None) -> list[str] | None:
    """A shortest import path start -> ... -> goal (breadth first), optionally only through `within`."""
    parent = {start: None}
    queue = deque([start])
    while queue:
        node = queue.popleft()
        for nxt in sorted(graph.get(node, ())):
            if within is not None and nxt not in within:
                continue
            if nxt == goal:
                path = [nxt, node]
                while parent[path[-1]] is not None:
                    path.append(parent[path[-1]])
                return path[::-1]
            if nxt not in parent:
                parent[nxt] = node
                queue.append(nxt)
    return None


def strongly_connected(graph) -> list[list[str]]:
    """The strongly connected components of more than one module (Tarjan, iterative), each sorted."""
    index: dict[str, int] = {}
    low: dict[str, int] = {}
    on_stack: set[str] = set()
    stack: list[str] = []
    components: list[list[str]] = []
    counter = 0
    for root in sorted(graph):
        if root in index:
            continue
        work = [(root, iter(sorted(graph.get(root, ()))))]
        index[root] = low[root] = counter
        counter += 1
        stack.append(root)
        on_stack.add(root)
        while work:
            node, children = work[-1]
            child = next(children, None)
            if child is not None:
                if child not in index:
                    index[child] = low[child] = counter
                    counter += 1
                    stack.append(child)
                    on_stack.add(child)
                    work.append((child, iter(sorted(graph.get(child, ())))))
                elif child in on_stack:
                    low[node] = min(low[node], index[child])
                continue
            work.pop()
            if work:
                low[work[-1][0]] = min(low[work[-1][0]], low[node])
            if low[node] == index[node]:
                component = []
                while True:
                    m = stack.pop()
                    on_stack.discard(m)
                    component.append(m)
                    if m == node:
                        break
                if len(component) > 1:
                    components.append(sorted(component))
    return sorted(components)


def import_cycles(graph) -> list[list[str]]:
    """One cycle per tangle of modules, as a path that starts and ends at the same module."""
    cycles = []
    for component in strongly_connected(graph):
        start = component[0]
        cycles.append(_path(graph, start, start, within=set(component)))
    return cycles


def _describe(graph) -> str:
    """Each tangle: its modules, and one cycle through them as a path."""
    return "\n".join(
        f"{len(component)} modules import each other ({', '.join(component)}); one cycle: {' -> '.join(cycle)}"
        for component, cycle in zip(strongly_connected(graph), import_cycles(graph))
    )


def dock_modules(manifest: Path = MANIFEST) -> list[str]:
    """The modules of the widgets the npe2 manifest contributes (the docks)."""
    contributions = yaml.safe_load(manifest.read_text(encoding="utf-8"))["contributions"]
    python_name = {c["id"]: c["python_name"] for c in contributions.get("commands", [])}
    return sorted({python_name[w["command"]].partition(":")[0] for w in contributions.get("widgets", [])})


# ---- the package ---------------------------------------------------------------------------


def test_the_graph_sees_the_packages_and_their_imports():
    graph = import_graph()
    # a few edges known from the code, one of each kind: relative, absolute, lazy, across packages
    assert "napari_retina.io.errors" in graph["napari_retina.models.registry"]  # from ..io.errors import
    assert "napari_retina.models.registry" in graph["napari_retina.models.versions"]  # from .registry import
    assert "napari_retina.models.segmenter" in graph["napari_retina.models.microaneurysms"]  # inside a method
    assert any(m.startswith("napari_retina.") for m in graph["training.data"])
    assert len(graph) > 40 and set(dock_modules()) <= set(graph)


def test_no_import_cycle():
    graph = import_graph()
    assert not import_cycles(graph), "import cycles (break each one; a lazy import is still one):\n" + _describe(graph)


def test_no_dock_imports_another_dock():
    graph = import_graph()
    docks = dock_modules()
    assert len(docks) >= 2, f"the manifest names {docks} as docks"
    offences = [
        " -> ".join(path)
        for a in docks
        for b in docks
        if a != b and (path := _path(graph, a, b)) is not None
    ]
    assert not offences, (
        "a dock imports another dock (docks meet through the session, never each other):\n" + "\n".join(offences)
    )


# ---- the checker itself ------------------------------------------------------------------------


def _write(root: Path, files: dict[str, str]) -> None:
    for name, text in files.items():
        path = root / name
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(text, encoding="utf-8")


def test_the_cycle_finder_finds_a_lazy_cycle_through_relative_imports(tmp_path):
    _write(tmp_path, {
        "pkg/__init__.py": "",
        "pkg/a.py": "from .sub import b\n",  # pkg.a -> pkg.sub.b
        "pkg/sub/__init__.py": "",
        "pkg/sub/b.py": "def f():\n    from ..c import g\n",  # lazy: pkg.sub.b -> pkg.c
        "pkg/c.py": "from typing import TYPE_CHECKING\nif TYPE_CHECKING:\n    import pkg.a\n",  # pkg.c -> pkg.a
        "pkg/d.py": "from . import a\nimport os\n",  # into the cycle, not part of it
    })
    graph = import_graph(tmp_path, ["pkg"])
    assert graph["pkg.a"] == {"pkg.sub.b"} and graph["pkg.sub.b"] == {"pkg.c"} and graph["pkg.d"] == {"pkg.a"}
    assert import_cycles(graph) == [["pkg.a", "pkg.sub.b", "pkg.c", "pkg.a"]]


def test_the_cycle_finder_passes_a_tree_and_reports_each_tangle():
    tree = {"a": {"b", "c"}, "b": {"c"}, "c": set()}
    assert import_cycles(tree) == []
    two = {"a": {"b"}, "b": {"a", "c"}, "c": {"d"}, "d": {"c"}, "e": {"a"}}
    assert import_cycles(two) == [["a", "b", "a"], ["c", "d", "c"]]


def test_docks_are_read_from_the_manifest(tmp_path):
    manifest = tmp_path / "napari.yaml"
    manifest.write_text(
        "name: x\ncontributions:\n  commands:\n"
        "    - {id: x.one, python_name: 'p.w.one:One', title: One}\n"
        "    - {id: x.two, python_name: 'p.w.two:Two', title: Two}\n"
        "    - {id: x.read, python_name: 'p._npe2:get_reader', title: Read}\n"
        "  widgets:\n    - {command: x.two, display_name: Two}\n    - {command: x.one, display_name: One}\n",
        encoding="utf-8",
    )
    assert dock_modules(manifest) == ["p.w.one", "p.w.two"]
