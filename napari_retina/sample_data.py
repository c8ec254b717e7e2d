"""The IDRiD sample image shipped with the plugin, with its five lesion masks (see samples/ATTRIBUTION.md)."""

from __future__ import annotations

import atexit
from contextlib import ExitStack
from importlib.resources import as_file, files
from pathlib import Path

from napari_retina.lesions import LESIONS

# IDRiD training image 22: hard and soft exudates, haemorrhages, microaneurysms and the optic disc
IDRID_SAMPLE_STEM = "IDRiD_22"

_extracted = ExitStack()  # only used when the package is imported from a zip
atexit.register(_extracted.close)


def _sample_file(name: str) -> Path:
    res = files("napari_retina").joinpath("samples", name)
    if isinstance(res, Path):
        return res
    return Path(_extracted.enter_context(as_file(res)))


def idrid_sample_path() -> Path:
    """Path of the sample fundus photograph (``IDRiD_22.jpg``, 4288 x 2848 RGB JPEG)."""
    return _sample_file(f"{IDRID_SAMPLE_STEM}.jpg")


def idrid_sample_masks() -> dict[str, Path]:
    """Paths of the sample's masks by lesion code, in ``LESIONS`` order (IDRiD 1-bit TIFFs)."""
    return {les.code: _sample_file(les.mask_filename(IDRID_SAMPLE_STEM)) for les in LESIONS}
