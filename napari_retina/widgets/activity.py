"""napari's activity while this plugin's long runs go on: its progress bars, moved the way they
show, and its "in progress" animation, slowed.

napari turns its activity animation (a GIF in the status bar) at 33 frames a second while any
progress bar is open. Under a software OpenGL (Mesa llvmpipe: remote desktops, virtual
machines without a GPU), every frame recomposes the whole window: 0.6 of a 2-core machine's
CPU, taken from the model or the training: slowing it took "Find microaneurysms" from 29 to 19 s
(benchmarks/find_responsiveness.py). During this plugin's runs it turns at a fifth of that
speed; the progress bar and the status line still move. Qt's public QMovie API does it; the
animation is found among the widgets of the window that holds the dock (Qt's own
`QWidget.window()`), as no napari API reaches it.
"""

from __future__ import annotations

from qtpy.QtWidgets import QLabel, QWidget

ACTIVITY_SPEED_PERCENT = 20

# runs may overlap (Find exudates, then Find microaneurysms, a training beside them): the
# animations stay slow until the last of them ends, and then get back the speed they had
_holders: set[int] = set()
_saved: list = []  # (movie, speed before)


class SlowAnimations:
    """Held while one run goes on: `release()` (idempotent) when it ends."""

    def __init__(self, widget, percent: int = ACTIVITY_SPEED_PERCENT):
        """`widget`: a widget of the plugin's dock; the animations of its top-level window slow down."""
        self._released = False
        _holders.add(id(self))
        window = widget.window() if isinstance(widget, QWidget) else None
        if window is None or window is widget:  # not docked in a window yet: nothing to slow
            return
        for label in window.findChildren(QLabel):
            movie = label.movie()
            if movie is not None and movie.speed() > percent:
                _saved.append((movie, movie.speed()))
                movie.setSpeed(percent)

    def release(self) -> None:
        if self._released:
            return
        self._released = True
        _holders.discard(id(self))
        if _holders:
            return
        while _saved:
            movie, speed = _saved.pop()
            try:
                movie.setSpeed(speed)
            except RuntimeError:  # its label was deleted meanwhile
                pass


def move_bar(pbar, done: int, total: int) -> None:
    """Show `done` of `total` on a napari progress bar. `update()` is what moves napari's bar (setting
    `.n` emits nothing), and the bar processes pending Qt events while it moves, a run's end among
    them: call this last in a slot, after the status line, so that line is not overwritten."""
    if pbar.total != total:
        pbar.total = total
    pbar.update(min(done, total) - pbar.n)
