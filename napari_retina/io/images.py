"""Reading fundus photographs as (H, W, 3) uint8 RGB, whatever the file's mode, depth or orientation.

Every reader in napari-retina (napari, CLI, training data) goes through `read_fundus`, so an
image has one pixel grid everywhere: EXIF orientation applied, alpha dropped, depth reduced
to 8 bits. Any failure is a one-line `RetinaInputError` naming the file.
"""

from __future__ import annotations

import hashlib
import os
from pathlib import Path

import numpy as np
from PIL import Image, UnidentifiedImageError

from .errors import RetinaInputError

__all__ = [
    "IMAGE_EXTENSIONS",
    "image_shape",
    "is_image_path",
    "read_fundus",
    "sha256_file",
]

IMAGE_EXTENSIONS: tuple[str, ...] = (".jpg", ".jpeg", ".png", ".tif", ".tiff")

_TIFF_SUFFIXES = (".tif", ".tiff")
_EXIF_ORIENTATION = 274  # EXIF/TIFF tag: how the stored pixels must be turned for display


def is_image_path(path: str | os.PathLike) -> bool:
    """True when the file name has a fundus image extension (case-insensitive); no I/O."""
    return Path(path).suffix.lower() in IMAGE_EXTENSIONS


def _fail(path: Path, reason: str) -> RetinaInputError:
    return RetinaInputError(f"{path.name}: {reason}")


def _check_file(path: Path) -> None:
    """Catch the plain file problems first, so their message is not 'damaged image'."""
    try:
        st = path.stat()
    except FileNotFoundError:
        raise _fail(path, "file not found") from None
    except OSError as e:
        raise _fail(path, f"cannot read ({e.strerror or e})") from None
    if path.is_dir():
        raise _fail(path, "is a folder, not an image")
    if st.st_size == 0:
        raise _fail(path, "not a readable image (empty file)")


def _looks_like_tiff(path: Path) -> bool:
    try:
        with open(path, "rb") as f:
            head = f.read(4)
    except OSError:
        return False
    return head[:2] in (b"II", b"MM") or path.suffix.lower() in _TIFF_SUFFIXES


def _orientation(im: Image.Image) -> int:
    """EXIF orientation 1-8 still to apply to `im`'s pixels, from the header (1 when absent or damaged).

    For a TIFF this is the tag as it stands: before `load()` what the file says; after it 1
    where Pillow (>= 11) has already turned the pixels upright and dropped the tag.
    """
    try:
        if im.format == "TIFF":
            value = int(im.tag_v2.get(_EXIF_ORIENTATION, 1))
            return value if 1 <= value <= 8 else 1
        if im.format == "PNG":
            # PIL's PNG getexif() decodes the whole image to find a late eXIf chunk; read the early one only
            raw = im.info.get("exif")
            if not raw:
                return 1
            exif = Image.Exif()
            exif.load(raw)
        else:
            exif = im.getexif()
        value = int(exif.get(_EXIF_ORIENTATION, 1))
    except Exception:  # a damaged EXIF block must not stop the pixels from being read
        return 1
    return value if 1 <= value <= 8 else 1


def _apply_orientation(arr: np.ndarray, orientation: int) -> np.ndarray:
    """The numpy twin of PIL.ImageOps.exif_transpose (checked against it in the tests)."""
    if orientation == 2:
        return arr[:, ::-1]
    if orientation == 3:
        return arr[::-1, ::-1]
    if orientation == 4:
        return arr[::-1]
    if orientation == 5:
        return arr.swapaxes(0, 1)
    if orientation == 6:
        return np.rot90(arr, -1)
    if orientation == 7:
        return arr.swapaxes(0, 1)[::-1, ::-1]
    if orientation == 8:
        return np.rot90(arr, 1)
    return arr


def _to_rgb8(arr: np.ndarray, path: Path) -> np.ndarray:
    """Any 2-D/3-D pixel array -> (H, W, 3) uint8: alpha dropped, grey replicated, depth scaled."""
    if arr.ndim == 3 and arr.shape[2] == 1:
        arr = arr[..., 0]
    if arr.ndim == 3 and arr.shape[2] == 2:  # grey + alpha
        arr = arr[..., 0]
    elif arr.ndim == 3 and arr.shape[2] in (3, 4):
        arr = arr[..., :3]
    elif arr.ndim != 2:
        raise _fail(path, f"unsupported image layout {'x'.join(map(str, arr.shape))} (expected grey or RGB)")
    if arr.shape[0] == 0 or arr.shape[1] == 0:
        raise _fail(path, "not a readable image (no pixels)")

    if arr.dtype == np.bool_:
        arr = arr.astype(np.uint8) * 255
    elif arr.dtype == np.uint8:
        pass
    elif arr.dtype.kind in "ui" and arr.dtype.itemsize <= 4:
        if arr.dtype.itemsize == 4 and arr.size and int(arr.max()) > 65535:
            raise _fail(path, f"unsupported pixel type {arr.dtype} (values above 16 bits)")
        # full 16-bit range -> 8 bits, rounded: (v + 128) // 257 == round(v / 257) exactly since 257 is odd
        v = np.clip(arr, 0, 65535).astype(np.uint32)
        arr = ((v + 128) // 257).astype(np.uint8)
    elif arr.dtype.kind == "f":
        f = np.nan_to_num(arr.astype(np.float64, copy=False), nan=0.0, posinf=1.0, neginf=0.0)
        if f.size and f.max() > 1.0 + 1e-6:
            raise _fail(path, f"unsupported float image (values up to {f.max():.4g}, expected 0..1)")
        arr = np.rint(np.clip(f, 0.0, 1.0) * 255.0).astype(np.uint8)
    else:
        raise _fail(path, f"unsupported pixel type {arr.dtype}")

    if arr.ndim == 2:
        arr = np.repeat(arr[..., None], 3, axis=2)
    return arr


def _tiff_page_array(path: Path) -> tuple[np.ndarray, int]:
    """First page of a TIFF via tifffile (exact 16-bit and float samples), with its orientation."""
    import tifffile

    with tifffile.TiffFile(path) as tf:
        page = tf.pages[0]
        arr = page.asarray()
        tag = page.tags.get(_EXIF_ORIENTATION)
        orientation = int(tag.value) if tag is not None else 1
        if page.axes.startswith("S") and arr.ndim == 3:  # planar-separate samples come first
            arr = np.moveaxis(arr, 0, -1)
    return arr, orientation if 1 <= orientation <= 8 else 1


def _is_deep_tiff(im: Image.Image) -> bool:
    """More than 8 bits or non-integer samples: PIL would truncate (RGB;16 keeps the high byte)."""
    if im.format != "TIFF":
        return False
    bits = im.tag_v2.get(258, (1,))
    bits = bits if isinstance(bits, tuple) else (bits,)
    fmt = im.tag_v2.get(339, (1,))
    fmt = fmt if isinstance(fmt, tuple) else (fmt,)
    return max(bits) > 8 or any(f != 1 for f in fmt)


def _is_deep_png_colour(im: Image.Image) -> bool:
    """16-bit colour PNG: PIL decodes it to 8 bits by dropping the low byte, not by rounding."""
    if im.format != "PNG" or im.mode.startswith("I") or not im.tile:
        return False
    return ";16" in str(im.tile[0].args)


def _png16_array(path: Path) -> np.ndarray:
    import cv2

    arr = cv2.imdecode(np.fromfile(path, dtype=np.uint8), cv2.IMREAD_UNCHANGED)
    if arr is None:
        raise ValueError("OpenCV could not decode the PNG")
    if arr.ndim == 3 and arr.shape[2] >= 3:
        arr = arr[..., [2, 1, 0]]  # OpenCV gives BGR(A)
    return arr


def _pil_array(im: Image.Image) -> np.ndarray:
    """Decoded pixels of a PIL image as an array that `_to_rgb8` understands."""
    im.load()  # truncated/damaged data fails here (LOAD_TRUNCATED_IMAGES must stay off)
    mode = im.mode
    if mode in ("1", "L", "LA", "RGB", "RGBA", "RGBX", "I", "F") or mode.startswith("I;16"):
        arr = np.asarray(im)
        return arr.astype(np.uint16) if mode.startswith("I;16") else arr
    if mode in ("P", "PA"):
        # via RGBA so a palette with transparency converts without a warning; alpha dropped later
        return np.asarray(im.convert("RGBA"))
    return np.asarray(im.convert("RGB"))  # CMYK, YCbCr, La, RGBa...


def _decode(path: Path) -> np.ndarray:
    try:
        im = Image.open(path)
    except UnidentifiedImageError:
        if _looks_like_tiff(path):  # e.g. float64 or odd-layout TIFFs that only tifffile reads
            try:
                arr, orientation = _tiff_page_array(path)
            except Exception:
                raise _fail(path, "not a readable image (damaged or unsupported TIFF)") from None
            return _apply_orientation(_to_rgb8(arr, path), orientation)
        raise _fail(path, "not a readable image (not a JPEG, PNG or TIFF file)") from None
    with im:
        fmt = im.format or "image"
        codec_missing = False
        try:
            arr = None
            if _is_deep_tiff(im):
                try:
                    arr, orientation = _tiff_page_array(path)  # stored pixels and the file's orientation
                except ValueError as e:
                    # codec missing in tifffile (e.g. LZW without imagecodecs): PIL may still decode it
                    codec_missing = "imagecodecs" in str(e)
            elif _is_deep_png_colour(im):
                orientation = _orientation(im)
                arr = _png16_array(path)
            if arr is None:
                arr = _pil_array(im)
                orientation = _orientation(im)  # after load: Pillow may have applied a TIFF's already
        except (RetinaInputError, MemoryError, Image.DecompressionBombError):
            raise
        except Exception:
            if codec_missing:
                raise _fail(path, "unsupported TIFF compression for this bit depth (needs the imagecodecs package)") from None
            raise _fail(path, f"not a readable image (truncated or damaged {fmt})") from None
    return _apply_orientation(_to_rgb8(arr, path), orientation)


def read_fundus(path: str | os.PathLike) -> np.ndarray:
    """The photograph at `path` as a C-contiguous (H, W, 3) uint8 RGB array, upright.

    EXIF orientation is applied; grey is replicated; alpha is dropped; palettes are
    expanded; 16-bit samples become round(v / 257); float samples in [0, 1] are scaled
    by 255. Raises RetinaInputError (one line naming the file) on any failure.
    """
    p = Path(path)
    _check_file(p)
    try:
        arr = _decode(p)
    except RetinaInputError:
        raise
    except Image.DecompressionBombError:
        raise _fail(p, "image too large to open safely") from None
    except MemoryError:
        raise _fail(p, "not enough memory to open this image") from None
    except OSError as e:
        raise _fail(p, f"cannot read ({e.strerror or e})") from None
    return np.ascontiguousarray(arr)


def image_shape(path: str | os.PathLike) -> tuple[int, int]:
    """(H, W) of the upright image (as `read_fundus` returns it), from the header only."""
    p = Path(path)
    _check_file(p)
    try:
        with Image.open(p) as im:
            if im.format == "TIFF":  # stored size: newer Pillow reports a TIFF's size already turned
                w, h = int(im.tag_v2[256]), int(im.tag_v2[257])
            else:
                w, h = im.size
            orientation = _orientation(im)
    except UnidentifiedImageError:
        if not _looks_like_tiff(p):
            raise _fail(p, "not a readable image (not a JPEG, PNG or TIFF file)") from None
        try:
            import tifffile

            with tifffile.TiffFile(p) as tf:
                page = tf.pages[0]
                h, w = int(page.imagelength), int(page.imagewidth)
                tag = page.tags.get(_EXIF_ORIENTATION)
                orientation = int(tag.value) if tag is not None else 1
        except Exception:
            raise _fail(p, "not a readable image (damaged or unsupported TIFF)") from None
    except Image.DecompressionBombError:
        raise _fail(p, "image too large to open safely") from None
    except OSError as e:
        raise _fail(p, f"cannot read ({e.strerror or e})") from None
    return (w, h) if orientation in (5, 6, 7, 8) else (h, w)


def sha256_file(path: str | os.PathLike, chunk_size: int = 1 << 20) -> str:
    """Hex SHA-256 of the file's bytes, read in chunks (images can be tens of MB)."""
    p = Path(path)
    h = hashlib.sha256()
    try:
        with open(p, "rb") as f:
            while chunk := f.read(chunk_size):
                h.update(chunk)
    except FileNotFoundError:
        raise _fail(p, "file not found") from None
    except OSError as e:
        raise _fail(p, f"cannot read ({e.strerror or e})") from None
    return h.hexdigest()
