"""The one way a dock of this plugin lays out its content: in a vertical scroll area."""

from __future__ import annotations

from qtpy.QtCore import Qt
from qtpy.QtWidgets import QFrame, QScrollArea, QVBoxLayout, QWidget


def scrolling_layout(dock: QWidget) -> tuple[QVBoxLayout, QScrollArea, QWidget]:
    """(layout for `dock`'s content, the scroll area that fills the dock, the content widget).

    In a short window the dock scrolls instead of squeezing its rows (a squeezed table hides
    rows, squeezed wrapped labels are cut); never sideways.
    """
    outer = QVBoxLayout(dock)
    outer.setContentsMargins(0, 0, 0, 0)
    scroll = QScrollArea()
    scroll.setWidgetResizable(True)
    scroll.setFrameShape(QFrame.Shape.NoFrame)
    scroll.setHorizontalScrollBarPolicy(Qt.ScrollBarPolicy.ScrollBarAlwaysOff)
    outer.addWidget(scroll)
    content = QWidget()
    scroll.setWidget(content)
    return QVBoxLayout(content), scroll, content
