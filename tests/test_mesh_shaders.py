"""An ellipse added to a Shapes layer draws without recompiling the layer's shaders, and looks the same."""

import numpy as np
import pytest
from vispy.visuals.mesh import MeshVisual
from vispy.visuals.shaders.program import ModularProgram

from napari_retina.widgets.mesh_shaders import keep_mesh_shaders


def _ellipse(cy, cx, ry, rx):
    return np.array([[cy - ry, cx - rx], [cy - ry, cx + rx], [cy + ry, cx + rx], [cy + ry, cx - rx]], float)


def test_an_added_ellipse_reuses_the_compiled_shaders_and_draws_the_same(make_napari_viewer, qtbot, monkeypatch):
    assert keep_mesh_shaders()
    viewer = make_napari_viewer(show=True)
    viewer.add_image(np.zeros((200, 300), np.uint8))
    shapes = viewer.add_shapes(_ellipse(60, 80, 30, 50), shape_type="ellipse", edge_color="yellow",
                               face_color="transparent", edge_width=4)
    qtbot.wait(100)
    viewer.screenshot(canvas_only=True, flash=False)
    builds = []
    original = ModularProgram._build
    monkeypatch.setattr(ModularProgram, "_build", lambda self: builds.append(self) or original(self))

    shapes.add(_ellipse(140, 200, 40, 60), shape_type="ellipse", edge_color="magenta")
    qtbot.wait(100)
    shown = viewer.screenshot(canvas_only=True, flash=False)
    assert builds == []
    rgb = shown[..., :3].astype(int)  # the new ellipse is drawn: magenta along its outline
    assert ((rgb[..., 0] > 150) & (rgb[..., 1] < 60) & (rgb[..., 2] > 150)).sum() > 50

    # vispy's own code rebuilds the meshes' programs when their data change, and draws the same
    monkeypatch.setattr(MeshVisual, "_build_color_transform", MeshVisual._build_color_transform.__wrapped__)
    shapes.add(_ellipse(10, 10, 2, 2), shape_type="ellipse")
    shapes.selected_data = {2}
    shapes.remove_selected()
    qtbot.wait(100)
    again = viewer.screenshot(canvas_only=True, flash=False)
    assert len(builds) >= 1
    np.testing.assert_array_equal(again, shown)


def test_colour_mapped_meshes_keep_their_own_limits():
    keep_mesh_shaders()
    mesh = MeshVisual.__new__(MeshVisual)  # only the colour-transform builder is exercised
    values = np.zeros((4, 1), np.float32)
    with pytest.raises(AttributeError):  # vispy's path: it needs the mesh's colour limits
        MeshVisual._build_color_transform(mesh, values)
    rgba = np.ones((4, 4), np.float32)
    assert MeshVisual._build_color_transform(mesh, rgba) is MeshVisual._build_color_transform(mesh, rgba)
