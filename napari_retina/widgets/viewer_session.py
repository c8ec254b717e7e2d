"""The annotation session of a napari viewer: one per viewer, found by every dock.

napari hands a plugin dock opened from the Plugins menu a `PublicOnlyProxy` of the viewer, a
new proxy object each time, so two docks of the same window never hold the same object. The
session is therefore keyed by the viewer itself: the proxy is a wrapt `ObjectProxy`, whose
documented `__wrapped__` attribute is the object it stands for.
"""

from __future__ import annotations

import weakref

from ..session import AnnotationSession

_SESSIONS: "weakref.WeakKeyDictionary[object, AnnotationSession]" = weakref.WeakKeyDictionary()


def real_viewer(viewer):
    """The viewer behind napari's proxies (the viewer itself when it is not a proxy)."""
    seen = 0
    while hasattr(type(viewer), "__wrapped__") or _is_proxy(viewer):
        inner = getattr(viewer, "__wrapped__", None)
        if inner is None or inner is viewer or seen > 8:
            break
        viewer, seen = inner, seen + 1
    return viewer


def _is_proxy(obj) -> bool:
    try:
        import wrapt

        return isinstance(obj, wrapt.ObjectProxy)
    except ImportError:  # napari depends on wrapt; without it nothing is proxied
        return False


def session_of(viewer) -> AnnotationSession:
    """The session of `viewer` (or of the viewer a proxy stands for), made on first use."""
    key = real_viewer(viewer)
    session = _SESSIONS.get(key)
    if session is None:
        session = _SESSIONS[key] = AnnotationSession()
    return session
