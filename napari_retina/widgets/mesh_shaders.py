"""Keep vispy's mesh shaders compiled when a Shapes layer gains a shape.

vispy's `MeshVisual._update_data` (vispy 0.17; napari draws every Shapes layer as meshes)
builds a new, identical colour-transform function each time the mesh data change, so
every added ellipse recompiles the faces' and edges' shader programs at the next draw.
On a GPU that costs a millisecond; on the software OpenGL of a remote desktop or a
virtual machine without a GPU (Mesa llvmpipe, where many hospital workstations run) it
is about 25 ms of the GUI thread per ellipse, competing with the refinement for the
CPU (measured: benchmarks/refine_latency.py, median 140 -> 115 ms on 2 cores).

`keep_mesh_shaders()` hands every mesh the same function for per-vertex or per-face
colours (the case napari's shapes use), as vispy already does for its position function
(`_ensure_vec4_func`, cached), so an unchanged shader is not rebuilt. Colour-mapped
meshes (one value per vertex) keep vispy's own code path. Nothing here changes what is
drawn. It is written by hand because no vispy release offers it; where vispy's code is
not the one described (a later release), nothing is changed.
"""

from __future__ import annotations

import functools

_INSTALLED = False


def keep_mesh_shaders() -> bool:
    """Install once per process; True when vispy's mesh now reuses its colour function."""
    global _INSTALLED
    if _INSTALLED:
        return True
    try:
        from vispy.visuals.mesh import MeshVisual
        from vispy.visuals.shaders import Function
    except ImportError:
        return False
    original = getattr(MeshVisual, "_build_color_transform", None)
    if original is None or getattr(original, "_napari_retina", False):
        return False

    @functools.lru_cache(maxsize=1)
    def pass_through():
        return Function("vec4 pass(vec4 color) { return color; }")

    @functools.wraps(original)
    def build_color_transform(self, colors):
        if colors.ndim == 2 and colors.shape[1] == 1:
            return original(self, colors)  # a colour map with its own limits: vispy's way
        return pass_through()

    build_color_transform._napari_retina = True
    MeshVisual._build_color_transform = build_color_transform
    _INSTALLED = True
    return True
