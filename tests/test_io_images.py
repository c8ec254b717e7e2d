"""Fundus image reading: every input form becomes the same upright (H, W, 3) uint8 RGB grid."""

import hashlib

import numpy as np
import pytest
import tifffile
from PIL import Image, ImageOps

from napari_retina.io.errors import RetinaInputError
from napari_retina.io.images import (
    IMAGE_EXTENSIONS,
    image_shape,
    is_image_path,
    read_fundus,
    sha256_file,
)


def _exif(orientation):
    ex = Image.Exif()
    ex[274] = orientation
    return ex


def _pattern(h=6, w=9):
    rng = np.random.default_rng(0)
    return rng.integers(0, 256, (h, w, 3), dtype=np.uint8)


def test_is_image_path():
    assert IMAGE_EXTENSIONS == (".jpg", ".jpeg", ".png", ".tif", ".tiff")
    assert is_image_path("IDRiD_01.JPG") and is_image_path("a/b.Tiff") and is_image_path("x.png")
    assert not is_image_path("IDRiD_01.bmp") and not is_image_path("ellipses.json")
    assert not is_image_path("noext")


def test_jpeg_exif_orientation_6_is_rotated_clockwise(tmp_path):
    # stored 20 rows x 40 columns, red block in the stored top-left corner
    a = np.zeros((20, 40, 3), np.uint8)
    a[:8, :8] = (255, 0, 0)
    p = tmp_path / "rot.jpg"
    Image.fromarray(a).save(p, quality=95, exif=_exif(6))
    rgb = read_fundus(p)
    assert rgb.shape == (40, 20, 3)
    assert image_shape(p) == (40, 20)  # header-only shape agrees
    # orientation 6 = turn 90 degrees clockwise: stored top-left lands at displayed top-right
    assert rgb[1:6, -6:-1, 0].min() > 200 and rgb[1:6, -6:-1, 1:].max() < 60
    assert rgb[-6:, :6].max() < 60 and rgb[1:6, :6].max() < 60


@pytest.mark.parametrize("orientation", range(1, 9))
def test_every_orientation_matches_pil_exif_transpose(tmp_path, orientation):
    a = _pattern()
    p = tmp_path / f"o{orientation}.png"  # lossless, so pixels compare exactly
    Image.fromarray(a).save(p, exif=_exif(orientation))
    expected = np.asarray(ImageOps.exif_transpose(Image.open(p)).convert("RGB"))
    got = read_fundus(p)
    np.testing.assert_array_equal(got, expected)
    assert image_shape(p) == got.shape[:2]
    assert got.flags.c_contiguous and got.dtype == np.uint8


@pytest.mark.parametrize("form", ["raw", "lzw", "16bit"])
def test_tiff_orientation_tag_is_honoured_once(tmp_path, form):
    # Pillow >= 11 turns TIFFs upright itself on load; tifffile never does: both must end the same
    a = _pattern()
    p = tmp_path / f"o6_{form}.tif"
    if form == "16bit":
        tifffile.imwrite(p, a.astype(np.uint16) * 257, photometric="rgb", extratags=[(274, "H", 1, 6, True)])
    else:
        Image.fromarray(a).save(p, tiffinfo={274: 6}, compression="tiff_lzw" if form == "lzw" else None)
    np.testing.assert_array_equal(read_fundus(p), np.rot90(a, -1))
    assert image_shape(p) == (9, 6)


def test_grayscale_is_replicated(tmp_path):
    g = np.arange(60, dtype=np.uint8).reshape(6, 10) * 4
    p = tmp_path / "g.png"
    Image.fromarray(g).save(p)
    rgb = read_fundus(p)
    assert rgb.shape == (6, 10, 3)
    for c in range(3):
        np.testing.assert_array_equal(rgb[..., c], g)


def test_rgba_drops_alpha(tmp_path):
    a = _pattern()
    alpha = np.zeros(a.shape[:2], np.uint8)
    alpha[::2] = 255  # fully transparent rows must keep their colour, not turn black
    p = tmp_path / "rgba.png"
    Image.fromarray(np.dstack([a, alpha])).save(p)
    np.testing.assert_array_equal(read_fundus(p), a)


def test_grey_alpha_and_palette(tmp_path):
    g = np.array([[0, 10, 200], [255, 7, 3]], np.uint8)
    p = tmp_path / "la.png"
    Image.fromarray(np.dstack([g, np.full_like(g, 9)]), mode="LA").save(p)
    np.testing.assert_array_equal(read_fundus(p), np.repeat(g[..., None], 3, axis=2))

    idx = np.array([[0, 1], [2, 1]], np.uint8)
    pal = Image.frombytes("P", (2, 2), idx.tobytes())
    pal.putpalette([10, 20, 30, 200, 100, 50, 0, 255, 0])
    q = tmp_path / "pal.png"
    pal.save(q)
    colours = np.array([[10, 20, 30], [200, 100, 50], [0, 255, 0]], np.uint8)
    np.testing.assert_array_equal(read_fundus(q), colours[idx])


# 386 / 257 = 1.502 rounds to 2, where keeping the high byte (PIL's RGB;16 decode) gives 1
_V16 = np.array([0, 128, 129, 386, 25828, 25829, 65407, 65535], np.uint16)
_V8 = np.array([0, 0, 1, 2, 100, 101, 255, 255], np.uint8)  # round(v / 257) by hand


def test_16bit_grey_png_scaled_by_full_range(tmp_path):
    g = np.tile(_V16, (3, 1))
    p = tmp_path / "g16.png"
    Image.fromarray(g).save(p)  # PIL writes mode I;16 as a 16-bit grey PNG
    assert Image.open(p).mode == "I;16"
    rgb = read_fundus(p)
    np.testing.assert_array_equal(rgb[..., 0], np.tile(_V8, (3, 1)))
    np.testing.assert_array_equal(rgb[..., 0], rgb[..., 2])
    q = tmp_path / "g16_lzw.tif"  # LZW: tifffile needs imagecodecs for it, else PIL's I;16 decode is used
    Image.fromarray(g).save(q, compression="tiff_lzw")
    np.testing.assert_array_equal(read_fundus(q), rgb)


def test_16bit_rgb_tiff_scaled_by_full_range(tmp_path):
    a = np.zeros((2, len(_V16), 3), np.uint16)
    a[0, :, 0] = _V16  # red ramp on row 0
    a[1, :, 2] = _V16[::-1]  # blue ramp reversed on row 1
    p = tmp_path / "rgb16.tif"
    tifffile.imwrite(p, a, photometric="rgb")
    rgb = read_fundus(p)
    assert rgb.dtype == np.uint8 and rgb.shape == (2, len(_V16), 3)
    np.testing.assert_array_equal(rgb[0, :, 0], _V8)
    np.testing.assert_array_equal(rgb[1, :, 2], _V8[::-1])
    assert rgb[0, :, 1:].max() == 0 and rgb[1, :, :2].max() == 0
    assert image_shape(p) == (2, len(_V16))


def test_16bit_rgb_png_keeps_channel_order_and_rounds(tmp_path):
    a = np.zeros((1, len(_V16), 3), np.uint16)
    a[0, :, 0] = _V16
    a[0, :, 1] = 65535 - _V16
    p = tmp_path / "rgb16.png"
    import cv2

    assert cv2.imwrite(str(p), a[..., ::-1].copy())  # PIL cannot write 16-bit RGB; OpenCV wants BGR
    rgb = read_fundus(p)
    np.testing.assert_array_equal(rgb[0, :, 0], _V8)
    np.testing.assert_array_equal(rgb[0, :, 1], ((65535 - _V16.astype(np.uint32) + 128) // 257).astype(np.uint8))
    assert rgb[..., 2].max() == 0


def test_float_tiffs_in_unit_range(tmp_path):
    f = np.array([[0.0, 0.2, 1.0]], np.float32)
    p = tmp_path / "f32.tif"
    tifffile.imwrite(p, f)  # grey float32: PIL mode F
    np.testing.assert_array_equal(read_fundus(p)[..., 1], [[0, 51, 255]])
    q = tmp_path / "f64rgb.tif"
    tifffile.imwrite(q, np.dstack([f, 1 - f, f * 0]).astype(np.float64), photometric="rgb")  # PIL cannot open it
    rgb = read_fundus(q)
    np.testing.assert_array_equal(rgb[0], [[0, 255, 0], [51, 204, 0], [255, 0, 0]])
    assert image_shape(q) == (1, 3)


def _one_line_error(path):
    with pytest.raises(RetinaInputError) as ei:
        read_fundus(path)
    msg = str(ei.value)
    assert msg.startswith(f"{path.name}: ") and "\n" not in msg
    return msg


def test_truncated_jpeg(tmp_path):
    p = tmp_path / "IDRiD_55.jpg"
    Image.fromarray(_pattern(64, 64)).save(p, quality=90)
    data = p.read_bytes()
    p.write_bytes(data[: len(data) // 2])
    msg = _one_line_error(p)
    assert msg == "IDRiD_55.jpg: not a readable image (truncated or damaged JPEG)"


def test_not_an_image(tmp_path):
    p = tmp_path / "notes.jpg"
    p.write_text("this is not a photograph\n")
    assert "not a readable image" in _one_line_error(p)
    with pytest.raises(RetinaInputError, match="notes.jpg"):
        image_shape(p)


def test_empty_and_missing_files(tmp_path):
    empty = tmp_path / "empty.png"
    empty.write_bytes(b"")
    assert "empty file" in _one_line_error(empty)
    missing = tmp_path / "missing.tif"
    assert _one_line_error(missing) == "missing.tif: file not found"
    with pytest.raises(RetinaInputError, match="file not found"):
        image_shape(missing)


def test_unsupported_dimensionality(tmp_path):
    p = tmp_path / "five.tif"
    tifffile.imwrite(p, np.zeros((4, 5, 5), np.uint8), photometric="minisblack", planarconfig="contig")
    with pytest.raises(RetinaInputError) as ei:
        read_fundus(p)
    assert str(ei.value).startswith("five.tif: ") and "\n" not in str(ei.value)


def test_sha256_streams_whole_file(tmp_path):
    data = bytes(range(256)) * 9000  # larger than one chunk
    p = tmp_path / "x.jpg"
    p.write_bytes(data)
    assert sha256_file(p) == hashlib.sha256(data).hexdigest()
    q = tmp_path / "y.jpg"
    q.write_bytes(data[:-1])
    assert sha256_file(q) == hashlib.sha256(data[:-1]).hexdigest() != sha256_file(p)
    with pytest.raises(RetinaInputError, match="file not found"):
        sha256_file(tmp_path / "nope.jpg")
