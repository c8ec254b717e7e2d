"""Lesion masks: every IDRiD form reads to the same bool grid; writing always gives the 1-bit palette form."""

import numpy as np
import pytest
import tifffile
from PIL import Image, TiffImagePlugin

from napari_retina.io.errors import RetinaInputError
from napari_retina.io.masks import MASK_EXTENSIONS, read_mask, write_mask


def _lesions(h=13, w=21):
    """Odd sizes so that 1-bit rows do not end on a byte boundary."""
    m = np.zeros((h, w), bool)
    m[2:5, 3:17] = True
    m[0, 0] = m[-1, -1] = m[h // 2, w // 3] = True
    return m


def _idrid_training_tiff(path, m):
    """The IDRiD training form, made independently of write_mask's code path: 1-bit palette TIFF, LZW."""
    info = {TiffImagePlugin.PHOTOMETRIC_INTERPRETATION: 3, TiffImagePlugin.COLORMAP: (0, 65535, 0, 0, 0, 0)}
    Image.fromarray(m).save(path, compression="tiff_lzw", tiffinfo=info)
    im = Image.open(path)
    assert im.mode == "P" and im.tag_v2[258] == (1,)  # the fixture really is the 1-bit palette form


def _idrid_test_split_tiff(path, m):
    """The IDRiD test-split form: RGBA, lesion red 255, background black, alpha 255 everywhere."""
    rgba = np.zeros(m.shape + (4,), np.uint8)
    rgba[m, 0] = 255
    rgba[..., 3] = 255
    Image.fromarray(rgba, mode="RGBA").save(path, compression="tiff_lzw")


def _assert_idrid_tiff(path):
    im = Image.open(path)
    assert im.format == "TIFF" and im.mode == "P"
    assert im.tag_v2[258] == (1,)  # BitsPerSample 1
    assert im.tag_v2[262] == 3  # PhotometricInterpretation palette
    assert im.tag_v2[259] in (5, 8, 32946)  # LZW or deflate
    assert im.tag_v2[320] == (0, 65535, 0, 0, 0, 0)  # index 0 black, index 1 red
    assert im.getpalette() == [0, 0, 0, 255, 0, 0]


@pytest.mark.parametrize("make", [_idrid_training_tiff, _idrid_test_split_tiff], ids=["palette", "rgba"])
def test_idrid_forms_round_trip(tmp_path, make):
    m = _lesions()
    src = tmp_path / "IDRiD_55_EX.tif"
    make(src, m)
    got = read_mask(src)
    assert got.dtype == np.bool_ and got.shape == m.shape
    np.testing.assert_array_equal(got, m)  # alpha 255 everywhere is not read as lesion

    out = tmp_path / "out" / "IDRiD_55_EX.tif"
    out.parent.mkdir()
    assert write_mask(out, got) == out
    _assert_idrid_tiff(out)
    np.testing.assert_array_equal(read_mask(out, expected_shape=m.shape), m)
    np.testing.assert_array_equal(np.asarray(Image.open(out)), m.astype(np.uint8))  # indices 0/1 as stored
    assert [p.name for p in out.parent.iterdir()] == ["IDRiD_55_EX.tif"]  # no temp file left


def test_palette_lesion_is_the_index_not_the_colour(tmp_path):
    # a palette whose index 1 is black and index 0 red: the index decides, as in IDRiD
    m = _lesions()
    im = Image.frombytes("P", (m.shape[1], m.shape[0]), m.astype(np.uint8).tobytes())
    im.putpalette([255, 0, 0, 0, 0, 0])
    p = tmp_path / "odd_palette.tif"
    im.save(p)
    np.testing.assert_array_equal(read_mask(p), m)


def test_grey_bilevel_and_rgb_masks(tmp_path):
    m = _lesions()
    grey = tmp_path / "grey.png"
    Image.fromarray(m.astype(np.uint8) * 255).save(grey)
    np.testing.assert_array_equal(read_mask(grey), m)

    ones = tmp_path / "ones.tif"  # 0/1 grey: nonzero is lesion, not ">= 128"
    tifffile.imwrite(ones, m.astype(np.uint8))
    np.testing.assert_array_equal(read_mask(ones), m)

    bilevel = tmp_path / "bilevel.tif"
    Image.fromarray(m).save(bilevel)  # mode "1", min-is-black
    np.testing.assert_array_equal(read_mask(bilevel), m)

    rgb = np.zeros((1, 4, 3), np.uint8)
    rgb[0] = [(128, 0, 0), (127, 255, 255), (255, 255, 255), (0, 0, 255)]
    p = tmp_path / "rgb.png"
    Image.fromarray(rgb).save(p)
    np.testing.assert_array_equal(read_mask(p), [[True, False, True, False]])  # red >= 128


def test_png_round_trip_is_1bit_palette(tmp_path):
    m = _lesions()
    p = tmp_path / "IDRiD_01_MA.png"
    write_mask(p, m.astype(np.uint8) * 3)  # any truthy value is lesion
    raw = p.read_bytes()
    assert raw[:8] == b"\x89PNG\r\n\x1a\n" and raw[12:16] == b"IHDR"
    assert raw[24] == 1 and raw[25] == 3  # IHDR bit depth 1, colour type 3 (palette)
    im = Image.open(p)
    assert im.mode == "P" and im.getpalette()[:6] == [0, 0, 0, 255, 0, 0]
    np.testing.assert_array_equal(read_mask(p), m)


def test_write_replaces_existing_mask(tmp_path):
    p = tmp_path / "IDRiD_02_HE.tif"
    write_mask(p, np.ones((5, 9), bool))
    write_mask(p, np.zeros((5, 9), bool))
    assert not read_mask(p).any()
    write_mask(p, _lesions(5, 9))
    np.testing.assert_array_equal(read_mask(p), _lesions(5, 9))


def test_wrong_size(tmp_path):
    p = tmp_path / "IDRiD_03_OD.tif"
    write_mask(p, np.zeros((80, 100), bool))
    with pytest.raises(RetinaInputError) as ei:
        read_mask(p, expected_shape=(2848, 4288))
    assert str(ei.value) == "IDRiD_03_OD.tif: mask is 100x80 but the image is 4288x2848 (width x height)"
    assert read_mask(p, expected_shape=(80, 100, 3)).shape == (80, 100)  # an RGB image's shape is fine


@pytest.mark.filterwarnings("ignore:Corrupt EXIF data")  # PIL's own note on the cut TIFF
def test_unreadable_masks(tmp_path):
    text = tmp_path / "notes_EX.tif"
    text.write_text("not a mask")
    truncated = tmp_path / "cut_EX.tif"
    write_mask(truncated, np.random.default_rng(1).random((200, 300)) > 0.5)
    data = truncated.read_bytes()
    truncated.write_bytes(data[: len(data) // 3])
    empty = tmp_path / "empty_EX.png"
    empty.write_bytes(b"")
    for p in (text, truncated, empty, tmp_path / "missing_EX.tif"):
        with pytest.raises(RetinaInputError) as ei:
            read_mask(p)
        assert str(ei.value).startswith(f"{p.name}: ") and "\n" not in str(ei.value)


def test_write_errors(tmp_path):
    with pytest.raises(RetinaInputError, match="does not exist"):
        write_mask(tmp_path / "missing" / "IDRiD_04_SE.tif", _lesions())
    with pytest.raises(RetinaInputError, match=r"\.jpg"):
        write_mask(tmp_path / "IDRiD_04_SE.jpg", _lesions())
    with pytest.raises(RetinaInputError, match="2-D"):
        write_mask(tmp_path / "IDRiD_04_SE.tif", np.zeros((2, 3, 4), bool))
    assert list(tmp_path.iterdir()) == []
    assert MASK_EXTENSIONS == (".tif", ".tiff", ".png")
