"""napari's "in progress" animation, slowed while this plugin's long runs go on.

napari turns its activity animation (a GIF in the status bar) at 33 frames a second while any
progress bar is open. Under a software OpenGL (Mesa llvmpipe: remote desktops, virtual
machines without a GPU), every frame recomposes the whole window: 0.6 of a 2-core machine's
CPU, taken from the model or the training. It doubled "Find microaneurysms" (30 -> 16 s,
benchmarks/find_responsiveness.py). During this plugin's runs it turns at a fifth of that
speed; the progress bar and the status line still move. Qt's public QMovie API does it; the
animation is found in napari's window by its type, as no napari API reaches it.
"""

from __future__ import annotations

from qtpy.QtWidgets import QLabel

ACTIVITY_SPEED_PERCENT = 20


def slow_activity_animations(viewer, percent: int = ACTIVITY_SPEED_PERCENT) -> list:
    """Slow the animations in napari's window to `percent` of their speed; returns
    [(movie, speed before)] for `restore_animations`. Nothing happens where napari's window
    is not the one described (no Qt window, a napari without the animation)."""
    window = getattr(getattr(viewer, "window", None), "_qt_window", None)
    if window is None:
        return []
    slowed = []
    for label in window.findChildren(QLabel):
        movie = label.movie()
        if movie is not None and movie.speed() > percent:
            slowed.append((movie, movie.speed()))
            movie.setSpeed(percent)
    return slowed


def restore_animations(slowed: list) -> None:
    for movie, speed in slowed:
        try:
            movie.setSpeed(speed)
        except RuntimeError:  # its label was deleted meanwhile
            pass
