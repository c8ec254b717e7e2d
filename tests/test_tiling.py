"""The tiled inference engine: window plan, blending, field of view, progress, cancelling, torch wrapper."""

from __future__ import annotations

import json
import subprocess
import sys

import numpy as np
import pytest
from scipy import ndimage as ndi

from napari_retina.models.tiling import TilingCancelled, plan_tiles, predict_tiled, torch_predictor

H, W = 100, 140
RNG = np.random.default_rng(7)
KERNEL = RNG.normal(size=(2, 5, 5)).astype(np.float64)  # not symmetric: a flipped axis would show


def correlate(images: np.ndarray) -> np.ndarray:
    """(..., C, h, w) -> (..., 1, h, w): a 5 x 5 filter per channel, summed, zero beyond the border (r = 2)."""
    out = sum(ndi.correlate(images[..., ch, :, :].astype(np.float64), KERNEL[ch][(None,) * (images.ndim - 3)],
                            mode="constant", cval=0.0) for ch in range(images.shape[-3]))
    return out[..., None, :, :].astype(np.float32)


def random_image(h: int = H, w: int = W) -> np.ndarray:
    return np.random.default_rng(1).normal(size=(2, h, w)).astype(np.float32)


def disc(h: int, w: int, centre, radius) -> np.ndarray:
    yy, xx = np.mgrid[:h, :w]
    return (yy - centre[0]) ** 2 + (xx - centre[1]) ** 2 <= radius**2


@pytest.mark.parametrize("tile, overlap, batch", [(32, 16, 1), (64, 16, 3), (32, 8, 4), (140, 0, 1)])
def test_a_local_filter_gives_the_whole_image_result_whatever_the_tiling(tile, overlap, batch):
    image = random_image()
    expected = correlate(image)  # the filter on the whole image at once, computed apart
    out = predict_tiled(correlate, image, tile, overlap, batch=batch)
    assert out.shape == (1, H, W) and out.dtype == np.float32
    # zero padding in the tiles at the image border equals the filter's own: equal everywhere
    np.testing.assert_allclose(out, expected, atol=1e-5)


def test_windows_overlapping_less_than_the_receptive_field_would_show_seams():
    # the check above can fail: with a trim of 1 px (overlap 4) the 2-px filter sees tile borders
    image = random_image()
    out = predict_tiled(correlate, image, 32, 4)
    assert np.abs(out - correlate(image)).max() > 1e-3


@pytest.mark.parametrize("h, w", [(20, 30), (64, 17)])
def test_an_image_smaller_than_a_tile_is_padded_and_matches_the_whole_image(h, w):
    image = random_image(h, w)
    seen = []
    out = predict_tiled(lambda t: (seen.append(t.shape), correlate(t))[1], image, 64, 16)
    assert seen == [(1, 2, 64, 64)]  # one zero-padded tile
    np.testing.assert_allclose(out, correlate(image), atol=1e-5)


@pytest.mark.parametrize(
    "shape, tile, overlap, m",
    [((100, 140), 32, 16, 1), ((77, 123), 32, 12, 1), ((33, 200), 32, 31, 1), ((90, 61), 32, 20, 4),
     ((129, 129), 64, 32, 16), ((10, 300), 48, 0, 8)],
)
def test_the_plan_covers_the_image_and_blend_weights_sum_to_one(shape, tile, overlap, m):
    plan = plan_tiles(shape, tile, overlap, stride_multiple=m)
    for side, starts, length in zip(shape, (plan.rows, plan.cols), plan.canvas):
        assert length >= max(side, tile) and length % m == 0
        assert starts[0] == 0 and starts[-1] + tile == length  # the last window flush with the canvas
        assert all(s % m == 0 for s in starts)
        assert all(0 < b - a <= tile - overlap for a, b in zip(starts, starts[1:]))  # overlap never less
    assert plan.origins == tuple((y, x) for y in plan.rows for x in plan.cols)

    trim = overlap // 4
    for starts, length, weights in zip((plan.rows, plan.cols), plan.canvas, plan.axis_weights()):
        total = np.zeros(length)
        for s in starts:
            w = weights[s]
            total[s : s + tile] += w
            assert (w >= 0).all()
            # next to an inner border the window saw padding, not image: it must not count there
            if s > 0:
                assert (w[:trim] == 0).all()
            if s + tile < length:
                assert (w[tile - trim :] == 0).all()
        np.testing.assert_allclose(total, 1.0, atol=1e-12)


def test_constant_predictions_blend_to_exactly_that_constant_inside_the_fov_and_zero_outside():
    h, w = 77, 123
    fov = disc(h, w, (38, 61), 36)
    image = np.zeros((3, h, w), np.float32)
    out = predict_tiled(lambda t: np.ones((len(t), 2, 32, 32), np.float32), image, 32, 12, fov, out_channels=2)
    assert out.shape == (2, h, w)
    np.testing.assert_allclose(out[:, fov], 1.0, atol=1e-6)  # a plain sum would give 2 or 4 in overlaps
    assert (out[:, ~fov] == 0).all()


def test_tiles_without_fov_pixels_are_never_predicted():
    h, w, tile, overlap = 100, 140, 32, 16
    fov = disc(h, w, (70, 40), 20)
    # each pixel holds its own (row, col), so a tile tells where it came from
    image = np.stack(np.mgrid[:h, :w]).astype(np.float32)
    seen = []

    def record(tiles):
        seen.extend((int(t[0, 0, 0]), int(t[1, 0, 0])) for t in tiles)
        return np.ones((len(tiles), 1, tile, tile), np.float32)

    out = predict_tiled(record, image, tile, overlap, fov, batch=2)
    plan = plan_tiles((h, w), tile, overlap)
    touching = {(y, x) for y in plan.rows for x in plan.cols if fov[y : y + tile, x : x + tile].any()}
    assert len(seen) == len(set(seen))  # each once
    assert set(seen) == touching
    assert len(touching) < len(plan.rows) * len(plan.cols)  # some tiles were skipped indeed
    np.testing.assert_allclose(out[0, fov], 1.0, atol=1e-6)
    assert (out[0, ~fov] == 0).all()


def test_progress_counts_tiles_after_each_batch_up_to_the_total():
    image = random_image(64, 96)
    calls, batches = [], []
    predict_tiled(lambda t: (batches.append(len(t)), correlate(t))[1], image, 32, 16, batch=4,
                  progress=lambda done, total: calls.append((done, total)))
    total = len(plan_tiles((64, 96), 32, 16).origins)
    assert total == 15 and batches == [4, 4, 4, 3]
    assert calls == [(4, total), (8, total), (12, total), (15, total)]


def test_cancelling_after_the_first_batch_raises_and_stops_predicting():
    image = random_image(64, 96)
    batches, calls = [], []
    with pytest.raises(TilingCancelled):
        predict_tiled(lambda t: (batches.append(len(t)), correlate(t))[1], image, 32, 16, batch=2,
                      progress=lambda done, total: calls.append(done), cancelled=lambda: len(calls) >= 1)
    assert batches == [2] and calls == [2]


def test_stride_multiple_keeps_a_downsampling_predictor_on_one_pixel_grid():
    m, tile, overlap = 4, 64, 32

    def pooled(tiles):
        # average over m x m blocks of the tile, back to full size, then the 5 x 5 filter (radius <= 5 < 8)
        n, c, th, tw = tiles.shape
        blocks = tiles.reshape(n, c, th // m, m, tw // m, m).mean(axis=(3, 5))
        return correlate(blocks.repeat(m, axis=2).repeat(m, axis=3))

    h, w = 90, 122  # not multiples of 4: the canvas is zero-padded to 92 x 124
    image = random_image(h, w)
    padded = np.zeros((1, 2, 92, 124), np.float32)
    padded[0, :, :h, :w] = image
    expected = pooled(padded)[0, :, :h, :w]
    np.testing.assert_allclose(predict_tiled(pooled, image, tile, overlap, stride_multiple=m), expected, atol=1e-5)
    # without it, tiles start off the 4-pixel grid and the blocks disagree
    assert np.abs(predict_tiled(pooled, image, tile, overlap) - expected).max() > 1e-3


def test_torch_module_through_the_engine_matches_the_module_on_the_whole_image():
    torch = pytest.importorskip("torch")
    torch.manual_seed(0)
    net = torch.nn.Sequential(  # receptive-field radius 2, zero padding
        torch.nn.Conv2d(2, 4, 3, padding=1), torch.nn.ReLU(), torch.nn.Dropout(0.5),
        torch.nn.Conv2d(4, 1, 3, padding=1),
    )
    net.train()  # as during validation in the middle of training
    image = random_image()
    fov = disc(H, W, (50, 70), 48)
    out = predict_tiled(torch_predictor(net), image, 32, 16, fov, batch=8)
    assert net.training  # the mode it was in is restored
    net.eval()
    with torch.inference_mode():
        expected = torch.sigmoid(net(torch.from_numpy(image)[None]))[0].numpy()
    # dropout left on in the tiles would break this
    np.testing.assert_allclose(out[:, fov], expected[:, fov], atol=1e-5)
    assert (out[:, ~fov] == 0).all()


def test_bad_arguments_give_one_clear_message():
    image = random_image(40, 40)
    with pytest.raises(ValueError, match="overlap"):
        plan_tiles((40, 40), 32, 32)
    with pytest.raises(ValueError, match="multiple"):
        plan_tiles((40, 40), 30, 8, stride_multiple=16)
    with pytest.raises(ValueError, match="field-of-view"):
        predict_tiled(correlate, image, 32, 8, np.ones((40, 41), bool))
    with pytest.raises(ValueError, match="predict returned shape"):
        predict_tiled(lambda t: t, image, 32, 8)  # 2 channels back, 1 expected


def test_importing_the_engine_needs_neither_torch_nor_opencv_nor_a_gui():
    probe = (
        "import json, sys, napari_retina.models.tiling; "
        "print(json.dumps(sorted(m for m in ('torch', 'cv2', 'napari', 'qtpy') if m in sys.modules)))"
    )
    done = subprocess.run([sys.executable, "-c", probe], capture_output=True, text=True, check=True)
    assert json.loads(done.stdout.strip().splitlines()[-1]) == []


def test_partial_marks_final_only_pixels_no_window_to_come_will_change():
    image = random_image(64, 96)
    fov = disc(64, 96, (32, 48), 40)
    seen = []
    out = predict_tiled(correlate, image, 32, 16, fov=fov, batch=2,
                        partial=lambda o, final, box: seen.append((o.copy(), final.copy(), box)))
    assert len(seen) == 8  # one call per batch (15 windows)
    finals = [f for _, f, _ in seen]
    for a, b in zip(finals, finals[1:]):
        assert (b >= a).all()  # once final, always final
    assert finals[0].sum() < finals[-2].sum() < finals[-1].sum() == 64 * 96
    for o, final, _ in seen:  # a final value is the value the finished map has
        np.testing.assert_array_equal(o[0][final & fov], out[0][final & fov])
    # and a pixel not yet final did change afterwards somewhere (the flag is not trivially True)
    o, final, _ = seen[2]
    assert not np.allclose(o[0][~final & fov], out[0][~final & fov])


def test_partial_box_holds_every_pixel_the_batch_changed_and_no_more_than_its_windows():
    image = random_image(64, 96)
    fov = disc(64, 96, (32, 48), 40)
    seen = []
    predict_tiled(correlate, image, 32, 16, fov=fov, batch=2,
                  partial=lambda o, final, box: seen.append((o[0].copy(), box)))
    before = np.zeros((64, 96), np.float32)
    boxes = []
    for o, (r0, r1, c0, c1) in seen:
        inside = np.zeros((64, 96), bool)
        inside[r0:r1, c0:c1] = True
        assert not (o != before)[~inside].any()  # nothing changed outside the box
        assert (o != before)[inside].any()
        boxes.append((r1 - r0) * (c1 - c0))
        before = o
    assert max(boxes) < 64 * 96  # two 32-px windows of a batch, not the whole map
