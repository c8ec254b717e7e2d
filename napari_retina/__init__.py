"""napari-retina: lesion annotation of colour fundus photographs in napari.

Importing this package pulls in neither napari, Qt nor torch: the core
(io, lesions, metrics, models) runs headless; only `napari_retina.widgets`
needs a GUI.
"""

from importlib.metadata import PackageNotFoundError, version

try:
    __version__ = version("napari-retina")
except PackageNotFoundError:  # running from a checkout that is not installed (GPU machine)
    __version__ = "0.1.0.dev0"

from .lesions import LESION_CODES, LESIONS, lesion

__all__ = ["LESIONS", "LESION_CODES", "lesion", "__version__"]
