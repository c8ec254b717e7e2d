"""The scoring behind `evaluate refine`: size buckets, IoU inside ellipses, the image-level rule.

Fake refiners return masks chosen here, so every figure is known by hand.
"""

from __future__ import annotations

import numpy as np
import pytest

from conftest import H, W, blob_mask
from napari_retina.coarse import simulate_coarse_ellipses
from napari_retina.evaluation import (
    SIZE_BUCKETS,
    ellipse_overlaps,
    ellipse_regions,
    refined_lesions,
    score_refinement,
    size_bucket,
)
from napari_retina.io.ellipses import Ellipse, rasterize_ellipse
from napari_retina.lesions import REFINED_LESIONS


class FixedRefiner:
    """A refiner whose prediction for an image is set in advance (the image is told by its first pixel)."""

    def __init__(self, predictions: dict[int, np.ndarray], lesions=("EX",), superpixels=False):
        self.predictions = predictions
        self.config = {"lesions": list(lesions)}
        self.superpixels = superpixels
        self.threshold = 0.5
        self.calls: list[tuple[int, int, bool | None]] = []

    def refine_mask(self, rgb, ellipses, threshold=None, superpixels=None):
        k = int(rgb[0, 0, 0])
        self.calls.append((k, len(ellipses), superpixels))
        return self.predictions[k].copy()


def image(k: int, shape=(H, W)) -> np.ndarray:
    return np.full(shape + (3,), k, np.uint8)


@pytest.mark.parametrize("axes, bucket", [
    ((31.9, 5.0), "lt_32"),
    ((32.0, 5.0), "32_128"),
    ((5.0, 128.0), "32_128"),  # the semi-major axis is the larger one, whichever comes first
    ((128.5, 3.0), "gt_128"),
])
def test_size_bucket_by_semi_major_axis(axes, bucket):
    assert size_bucket(Ellipse("EX", (10.0, 10.0), axes)) == bucket
    assert bucket in SIZE_BUCKETS


def test_ellipse_regions_are_the_rasterised_ellipses():
    shape = (40, 50)
    ellipses = [
        Ellipse("HE", (20.3, 15.7), (9.0, 4.0), 33.0),
        Ellipse("HE", (2.0, 38.0), (7.5, 6.0), 120.0),  # clipped by the image's left and bottom edges
        Ellipse("HE", (30.0, 10.0), (0.2, 0.2)),  # smaller than a pixel: still its centre pixel
    ]
    for e, reg in zip(ellipses, ellipse_regions(ellipses, shape)):
        full = np.zeros(shape, bool)
        full[reg.rows, reg.cols] = reg.inside
        np.testing.assert_array_equal(full, rasterize_ellipse(e, shape))


def test_overlaps_inside_ellipses_by_hand():
    # thin horizontal ellipses (b = 0.5): ellipse i covers one row, columns x - a .. x + a
    shape = (8, 400)
    ellipses = [
        Ellipse("EX", (20.0, 1.0), (10.0, 0.5)),  # row 1, cols 10..30: 21 px
        Ellipse("EX", (100.0, 3.0), (40.0, 0.5)),  # row 3, cols 60..140: 81 px
        Ellipse("EX", (200.0, 5.0), (150.0, 0.5)),  # row 5, cols 50..350: 301 px
    ]
    gt = np.zeros(shape, bool)
    pred = np.zeros(shape, bool)
    gt[1, 15:25] = True  # cols 15..24
    pred[1, 20:30] = True  # cols 20..29
    gt[3, 0:100] = True  # inside ellipse 2: cols 60..99
    pred[3, 80:150] = True  # inside ellipse 2: cols 80..140
    pred[5, 300:400] = True  # inside ellipse 3: cols 300..350, no lesion there
    gt[0, :] = pred[7, :] = True  # outside every ellipse: not counted
    got = ellipse_overlaps(pred, gt, ellipse_regions(ellipses, shape))
    assert got == [("lt_32", 5, 15), ("32_128", 20, 81), ("gt_128", 0, 51)]


def _two_lesion_mask():
    # two EX blobs far apart: at reduction 1.0 each gets its own ellipse
    return blob_mask([(25, 30), (70, 100)], radius=3)


def test_pooled_iou_inside_ellipses_with_a_prediction_everywhere():
    gt = _two_lesion_mask()
    everywhere = np.ones(gt.shape, bool)
    refiner = FixedRefiner({0: everywhere})
    result = score_refinement(refiner, [("a", image(0), {"EX": gt})], reduction=1.0, seed=3)
    ellipses = simulate_coarse_ellipses(gt, "EX", reduction=1.0, seed=3)  # image 0: seed + 0
    assert len(ellipses) == 2
    # predicted everywhere: inside an ellipse the union is the ellipse, the intersection the lesion inside it
    expect: dict[str, list[tuple[int, int]]] = {b: [] for b in SIZE_BUCKETS}
    for e in ellipses:
        inside = rasterize_ellipse(e, gt.shape)
        expect[size_bucket(e)].append((int((gt & inside).sum()), int(inside.sum())))
    for bucket, pairs in expect.items():
        row = result["by_size"]["model"][bucket]
        assert row["EX"]["ellipses"] == row["all"]["ellipses"] == len(pairs)
        if pairs:
            pooled = 100 * sum(i for i, _ in pairs) / sum(u for _, u in pairs)
            assert row["EX"]["iou"] == row["all"]["iou"] == pytest.approx(pooled, abs=0.005)
        else:
            assert row["EX"]["iou"] is None and row["all"]["iou"] is None
    assert result["iou_percent"]["model"]["EX"]["mean"] == pytest.approx(100 * gt.sum() / gt.size, abs=0.005)
    assert result["ellipses"] == {"EX": 2}


def test_pooled_iou_weighs_ellipses_by_their_pixels_not_their_count():
    # two images, one ellipse each; the model finds the lesion exactly in the first and misses the second
    gt_small = blob_mask([(20, 20)], radius=2)
    gt_large = blob_mask([(40, 60)], radius=9)
    refiner = FixedRefiner({0: gt_small, 1: np.zeros_like(gt_large)})
    images = [("a", image(0, gt_small.shape), {"EX": gt_small}), ("b", image(1, gt_large.shape), {"EX": gt_large})]
    result = score_refinement(refiner, images)
    regions = [
        ellipse_regions(simulate_coarse_ellipses(g, "EX", seed=k), g.shape)[0] for k, g in enumerate((gt_small, gt_large))
    ]
    assert regions[0].bucket == regions[1].bucket  # both simulated ellipses fall in one bucket
    bucket = regions[0].bucket
    inter = int(gt_small.sum())  # the first ellipse: prediction == lesion
    union = int(gt_small.sum()) + int(gt_large.sum())  # the second: only the missed lesion
    assert result["by_size"]["model"][bucket]["EX"] == {"iou": pytest.approx(100 * inter / union, abs=0.005), "ellipses": 2}
    # the image-level mean gives each image the same weight: (1 + 0) / 2
    assert result["iou_percent"]["model"]["EX"]["mean"] == 50.0


def test_image_level_rule_false_positive_counts_as_zero_and_empty_images_are_skipped():
    gt = blob_mask([(20, 30)], radius=4)
    empty = np.zeros_like(gt)
    spurious = blob_mask([(10, 10)], radius=2)
    refiner = FixedRefiner({0: gt, 1: spurious, 2: empty})
    images = [
        ("lesion", image(0), {"EX": gt}),  # predicted exactly: IoU 1
        ("no_lesion", image(1), {}),  # no mask at all, yet a prediction: IoU 0, counted
        ("nothing", image(2), {"EX": empty}),  # neither: skipped
    ]
    result = score_refinement(refiner, images, methods=("initial", "model"))
    model = result["iou_percent"]["model"]
    assert model["EX"] == {"mean": 50.0, "std": 50.0, "images": 2}
    assert model["average"] == {"mean": 50.0, "std": 50.0}
    # the coarse ellipses exist only where the lesion does: one image counts
    assert result["iou_percent"]["initial"]["EX"]["images"] == 1
    # the refiner was asked about every image, with no ellipses where there is no lesion
    assert [(k, n) for k, n, _ in refiner.calls] == [(0, 1), (1, 0), (2, 0)]


def test_lesions_come_from_the_model_config():
    assert refined_lesions(FixedRefiner({}, lesions=("HE", "ma"))) == ("HE", "MA")
    no_config = FixedRefiner({})
    no_config.config = {}
    assert refined_lesions(no_config) == REFINED_LESIONS == ("MA", "SE", "EX", "HE")
    refiner = FixedRefiner({0: np.zeros((H, W), bool)}, lesions=("EX", "HE"))
    result = score_refinement(refiner, [("a", image(0), {"EX": _two_lesion_mask()})])
    assert result["lesions"] == ["EX", "HE"]
    assert set(result["iou_percent"]["model"]) == {"EX", "HE", "average"}
    assert set(result["by_size"]["model"]["lt_32"]) == {"EX", "HE", "all"}


def test_model_uses_the_shipped_superpixel_setting_and_is_computed_once_per_variant():
    gt = _two_lesion_mask()
    refiner = FixedRefiner({0: gt}, superpixels=True)
    result = score_refinement(refiner, [("a", image(0), {"EX": gt})],
                              methods=("model", "prototype", "prototype_superpixels"))
    # model == prototype_superpixels here: the refiner is asked once with and once without superpixels
    assert sorted(sp for _, _, sp in refiner.calls) == [False, True]
    assert result["iou_percent"]["model"] == result["iou_percent"]["prototype_superpixels"]


@pytest.mark.parametrize("kwargs, words", [
    ({"methods": ("initial", "magic")}, "magic"),
    ({"methods": ("baseline",)}, "baseline"),
    ({"reduction": 0.5}, "reduction"),
])
def test_bad_arguments_are_one_clear_error(kwargs, words):
    with pytest.raises(ValueError, match=words):
        score_refinement(FixedRefiner({0: np.zeros((H, W), bool)}), [("a", image(0), {})], **kwargs)


def test_a_mask_of_the_wrong_size_is_named():
    with pytest.raises(ValueError, match="img7.*EX"):
        score_refinement(FixedRefiner({0: np.zeros((H, W), bool)}), [("img7", image(0), {"EX": np.zeros((10, 10), bool)})])


class ProbabilityRefiner(FixedRefiner):
    """A refiner with a fixed probability map per image; refine_mask thresholds it like the real one."""

    def refine_probability(self, rgb, ellipses, superpixels=None):
        k = int(rgb[0, 0, 0])
        self.calls.append((k, len(ellipses), superpixels))
        return self.predictions[k].astype(np.float32)

    def refine_mask(self, rgb, ellipses, threshold=None, superpixels=None):
        return self.refine_probability(rgb, ellipses, superpixels) >= (self.threshold if threshold is None else threshold)


def test_threshold_sweep_scores_one_probability_map_at_every_threshold():
    gt = blob_mask([(30, 40)], radius=5)
    halo = blob_mask([(70, 100)], radius=4)  # away from the lesion: a false positive below 0.5
    refiner = ProbabilityRefiner({0: 0.8 * gt + 0.4 * halo})
    images = [("a", image(0), {"EX": gt})]
    swept = score_refinement(refiner, images, methods=("initial", "model"), thresholds=(0.3, 0.5, 0.9))
    assert refiner.calls == [(0, 1, False)]  # the network ran once for the three thresholds
    table = swept["by_threshold"]
    assert set(table) == {"0.3", "0.5", "0.9"} and set(table["0.3"]) == {"model"}
    expect = {"0.3": 100 * gt.sum() / (gt.sum() + halo.sum()), "0.5": 100.0}
    for t, value in expect.items():
        assert table[t]["model"]["EX"]["mean"] == pytest.approx(value, abs=0.005)
    assert table["0.9"]["model"]["EX"]["mean"] == 0.0  # nothing predicted on an image with the lesion
    # at the refiner's own threshold the sweep is the main table, and equals scoring without a sweep
    assert table["0.5"]["model"] == swept["iou_percent"]["model"]
    plain = score_refinement(refiner, images, methods=("initial", "model"))
    assert plain["iou_percent"] == swept["iou_percent"] and plain["by_size"] == swept["by_size"]
    assert "by_threshold" not in plain
    with pytest.raises(ValueError, match="thresholds"):
        score_refinement(refiner, images, thresholds=(1.5,))
