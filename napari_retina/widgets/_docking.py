"""The plugin's docks share one place in the window: the second one opened becomes a tab beside the first.

napari stacks plugin docks opened from the Plugins menu one above the other, which left the
annotator a strip at the bottom of the window once the Retrain dock was open. Qt's public
QMainWindow.tabifyDockWidget puts them side by side as tabs instead (napari offers no way to
ask for this from a manifest).
"""

from __future__ import annotations

from qtpy.QtWidgets import QDockWidget, QMainWindow

PLUGIN_SUFFIX = "(napari-retina)"  # napari titles a plugin's dock "<widget> (<plugin>)"


def _dock_of(widget) -> QDockWidget | None:
    parent = widget.parent()
    while parent is not None and not isinstance(parent, QDockWidget):
        parent = parent.parent()
    return parent


def tabify_with_plugin_docks(widget) -> bool:
    """Make `widget`'s dock a tab beside another dock of this plugin in the same window; True if it did."""
    dock, window = _dock_of(widget), widget.window()
    if dock is None or not isinstance(window, QMainWindow):
        return False
    for other in window.findChildren(QDockWidget):
        if other is dock or not other.isVisible() or not other.windowTitle().endswith(PLUGIN_SUFFIX):
            continue
        if window.dockWidgetArea(other) != window.dockWidgetArea(dock):
            continue
        if dock in window.tabifiedDockWidgets(other):
            return False  # already side by side
        window.tabifyDockWidget(other, dock)
        dock.show()
        dock.raise_()  # the dock just opened is the one in front
        return True
    return False
