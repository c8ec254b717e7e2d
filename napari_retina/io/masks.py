"""Lesion masks in the IDRiD convention: binary, full image size, 1-bit palette TIFF.

`read_mask` takes every form met in practice (IDRiD training palette TIFFs, the RGBA form of
the IDRiD test split, grey/bilevel/RGB TIFFs and PNGs); `write_mask` always writes the
IDRiD form (index 0 black = background, index 1 red = lesion), atomically.
"""

from __future__ import annotations

import os
from collections.abc import Sequence
from pathlib import Path

import numpy as np
from PIL import Image, TiffImagePlugin, UnidentifiedImageError, features

from .atomic import atomic_write
from .errors import RetinaInputError
from .images import _check_file, _fail, _looks_like_tiff

__all__ = ["MASK_EXTENSIONS", "read_mask", "write_mask"]

MASK_EXTENSIONS: tuple[str, ...] = (".tif", ".tiff", ".png")

# index 0 = (0, 0, 0) background, index 1 = (255, 0, 0) lesion, as in the IDRiD download
_PALETTE_RGB = (0, 0, 0, 255, 0, 0)
# TIFF ColorMap: all reds, then all greens, then all blues, 16 bits each, 2**BitsPerSample entries
_TIFF_COLORMAP = (0, 65535, 0, 0, 0, 0)


def _mask_from_array(arr: np.ndarray, path: Path) -> np.ndarray:
    """Lesion pixels of a decoded array: grey -> nonzero, colour -> red at least half its range."""
    if arr.ndim == 3 and arr.shape[2] in (1, 2):  # grey (+ alpha): alpha is not the lesion
        arr = arr[..., 0]
    if arr.ndim == 2:
        return arr != 0
    if arr.ndim == 3 and arr.shape[2] in (3, 4):
        red = arr[..., 0]
        if red.dtype == np.bool_:
            return red.copy()
        if red.dtype.kind == "f":
            return red >= 0.5
        half = (int(np.iinfo(red.dtype).max) + 1) // 2 if red.dtype.kind in "ui" else 128
        return red >= half
    raise _fail(path, f"unsupported mask layout {'x'.join(map(str, arr.shape))} (expected one 2-D mask)")


def _mask_from_pil(im: Image.Image, path: Path) -> np.ndarray:
    im.load()  # truncated/damaged data fails here
    mode = im.mode
    if mode in ("P", "PA"):
        # the lesion is any non-zero palette index, whatever colour the palette gives it
        idx = np.asarray(im)
        return (idx[..., 0] if idx.ndim == 3 else idx) != 0
    if mode in ("1", "L", "LA", "I", "F", "RGB", "RGBA", "RGBX") or mode.startswith("I;16"):
        return _mask_from_array(np.asarray(im), path)
    return _mask_from_array(np.asarray(im.convert("RGB")), path)


def _read_tiff_with_tifffile(path: Path) -> np.ndarray:
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        arr = page.asarray()
        if page.axes.startswith("S") and arr.ndim == 3:  # planar-separate samples come first
            arr = np.moveaxis(arr, 0, -1)
        if page.photometric == tifffile.PHOTOMETRIC.PALETTE:
            return arr != 0
    return _mask_from_array(arr, path)


def read_mask(
    path: str | os.PathLike, expected_shape: Sequence[int] | None = None
) -> np.ndarray:
    """The lesion mask at `path` as a (H, W) bool array (True = lesion).

    Palette images: lesion = non-zero index (IDRiD training form). RGB/RGBA: lesion = red
    >= 128 (IDRiD test-split form; alpha is ignored). Grey/bilevel: lesion = non-zero.
    `expected_shape` (H, W), e.g. the image's, is checked; a mismatch or an unreadable file
    raises RetinaInputError with one line naming the file.
    """
    p = Path(path)
    _check_file(p)
    try:
        with Image.open(p) as im:
            mask = _mask_from_pil(im, p)
    except RetinaInputError:
        raise
    except UnidentifiedImageError:
        if not _looks_like_tiff(p):
            raise _fail(p, "not a readable mask (not a TIFF or PNG image)") from None
        try:
            mask = _read_tiff_with_tifffile(p)
        except RetinaInputError:
            raise
        except Exception:
            raise _fail(p, "not a readable mask (damaged or unsupported TIFF)") from None
    except Image.DecompressionBombError:
        raise _fail(p, "mask too large to open safely") from None
    except MemoryError:
        raise _fail(p, "not enough memory to open this mask") from None
    except Exception:
        raise _fail(p, "not a readable mask (truncated or damaged file)") from None

    if expected_shape is not None:
        eh, ew = (int(v) for v in tuple(expected_shape)[:2])
        if mask.shape != (eh, ew):
            h, w = mask.shape
            raise _fail(p, f"mask is {w}x{h} but the image is {ew}x{eh} (width x height)")
    return np.ascontiguousarray(mask, dtype=bool)


def _save_tiff(im: Image.Image, tmp: Path) -> None:
    # a mode "1" image packs 1 bit per pixel; the tags turn it into a 2-colour palette image,
    # which is how IDRiD stores masks (PIL's mode "P" would always write 8 bits per pixel)
    info = {
        TiffImagePlugin.PHOTOMETRIC_INTERPRETATION: 3,
        TiffImagePlugin.COLORMAP: _TIFF_COLORMAP,
    }
    compression = "tiff_lzw" if features.check("libtiff") else None  # LZW needs PIL's libtiff
    im.save(tmp, format="TIFF", compression=compression, tiffinfo=info)


def _save_png(bits: np.ndarray, tmp: Path) -> None:
    h, w = bits.shape
    im = Image.frombytes("P", (w, h), bits.astype(np.uint8).tobytes())  # index 0/1 per pixel
    im.putpalette(_PALETTE_RGB)
    im.save(tmp, format="PNG", bits=1, optimize=True)


def write_mask(path: str | os.PathLike, mask: np.ndarray) -> Path:
    """Write `mask` (any truthy pixel = lesion) to `path` in the IDRiD form, atomically.

    `.tif`/`.tiff`: 1-bit palette TIFF (black/red), LZW-compressed. `.png`: 1-bit palette
    PNG with the same palette. Returns the path written.
    """
    p = Path(path)
    m = np.asarray(mask)
    if m.ndim != 2 or m.shape[0] == 0 or m.shape[1] == 0:
        raise _fail(p, f"cannot save a mask of shape {m.shape}: it must be one 2-D image")
    bits = np.ascontiguousarray(m != 0) if m.dtype != np.bool_ else np.ascontiguousarray(m)
    suffix = p.suffix.lower()
    if suffix in (".tif", ".tiff"):
        im = Image.fromarray(bits)  # bool -> mode "1"
        return atomic_write(p, lambda tmp: _save_tiff(im, tmp))
    if suffix == ".png":
        return atomic_write(p, lambda tmp: _save_png(bits, tmp))
    raise _fail(p, f"cannot save a mask as {p.suffix or 'a file without extension'}; use .tif or .png")
