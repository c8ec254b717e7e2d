"""Metrics against values computed by hand on small rectangles."""

from __future__ import annotations

import math

import numpy as np
import pytest

from napari_retina.metrics import (
    dice,
    image_level_iou,
    iou,
    overlap_counts,
    pooled_iou,
    precision_recall_f1,
    summarise_image_ious,
)


def rect(r0, r1, c0, c1, shape=(10, 10)) -> np.ndarray:
    m = np.zeros(shape, bool)
    m[r0:r1, c0:c1] = True
    return m


# A: rows 0-3, cols 0-3 (16 px); B: rows 2-5, cols 2-5 (16 px); overlap rows 2-3, cols 2-3 (4 px)
A = rect(0, 4, 0, 4)
B = rect(2, 6, 2, 6)
EMPTY = np.zeros((10, 10), bool)


def test_iou_of_overlapping_rectangles():
    assert iou(A, B) == pytest.approx(4 / 28)  # union 16 + 16 - 4
    assert iou(B, A) == pytest.approx(4 / 28)
    assert iou(A, A) == 1.0


def test_dice_of_overlapping_rectangles():
    assert dice(A, B) == pytest.approx(2 * 4 / 32)
    assert dice(A, A) == 1.0


def test_precision_recall_f1_of_a_prediction_inside_the_truth():
    pred = rect(1, 3, 1, 4)  # 2 x 3 = 6 px, all inside A
    p, r, f1 = precision_recall_f1(pred, A)
    assert p == 1.0
    assert r == pytest.approx(6 / 16)
    assert f1 == pytest.approx(2 * 6 / (6 + 16))
    assert f1 == pytest.approx(2 * p * r / (p + r))


def test_precision_recall_f1_of_overlapping_rectangles():
    p, r, f1 = precision_recall_f1(A, B)
    assert (p, r, f1) == pytest.approx((4 / 16, 4 / 16, 8 / 32))


def test_empty_masks():
    assert math.isnan(iou(EMPTY, EMPTY))
    assert math.isnan(dice(EMPTY, EMPTY))
    assert iou(EMPTY, A) == 0.0  # a missed lesion counts as 0, not nan
    assert iou(A, EMPTY) == 0.0  # so does a lesion predicted where there is none
    p, r, f1 = precision_recall_f1(EMPTY, A)
    assert math.isnan(p) and r == 0.0 and f1 == 0.0
    p, r, f1 = precision_recall_f1(EMPTY, EMPTY)
    assert math.isnan(p) and math.isnan(r) and math.isnan(f1)


def test_image_level_iou_skips_images_without_the_lesion():
    mean, std = image_level_iou([(A, B), (EMPTY, EMPTY), (A, A)])
    # two images count: 1/7 and 1; population std = half their difference
    assert mean == pytest.approx((1 / 7 + 1) / 2)
    assert std == pytest.approx((1 - 1 / 7) / 2)


def test_image_level_iou_with_no_image_counting():
    mean, std = image_level_iou([(EMPTY, EMPTY)])
    assert math.isnan(mean) and math.isnan(std)
    assert all(math.isnan(v) for v in image_level_iou([]))


def test_image_level_iou_counts_a_prediction_without_the_lesion_as_zero():
    # an image with no lesion where the model predicts one scores 0 and counts
    mean, std = image_level_iou([(A, A), (B, EMPTY), (EMPTY, EMPTY)])
    assert (mean, std) == pytest.approx((0.5, 0.5))


def test_summarise_image_ious_is_the_image_level_average():
    assert summarise_image_ious([1 / 7, math.nan, 1.0]) == pytest.approx(((1 / 7 + 1) / 2, (1 - 1 / 7) / 2, 2))
    mean, std, n = summarise_image_ious([math.nan])
    assert math.isnan(mean) and math.isnan(std) and n == 0


def test_overlap_counts_inside_a_region():
    assert overlap_counts(A, B) == (4, 28)
    # region rows 0-2, cols 0-9: A there is rows 0-2 cols 0-3 (12 px), B rows 2 cols 2-5 (4 px), both row 2 cols 2-3
    assert overlap_counts(A, B, rect(0, 3, 0, 10)) == (2, 14)
    assert overlap_counts(A, B, EMPTY) == (0, 0)
    with pytest.raises(ValueError, match="region"):
        overlap_counts(A, B, np.ones((3, 3), bool))


def test_pooled_iou_sums_before_dividing():
    # a large region with IoU 20/40 and a small one with 1/1: pooled 21/41, not the mean 0.75
    assert pooled_iou([(20, 40), (1, 1)]) == pytest.approx(21 / 41)
    assert pooled_iou([(0, 0), (3, 4)]) == pytest.approx(3 / 4)  # an empty region adds nothing
    assert math.isnan(pooled_iou([(0, 0)]))
    assert math.isnan(pooled_iou([]))


def test_shape_mismatch_is_an_error():
    with pytest.raises(ValueError, match="shape"):
        iou(A, np.zeros((10, 11), bool))


def test_non_bool_input_counts_non_zero_as_lesion():
    assert iou(A.astype(np.uint8) * 255, B.astype(np.uint8)) == pytest.approx(4 / 28)


# ---- pixel-level precision-recall and lesion-level detection --------------------------------------


def test_aupr_from_histograms_equals_average_precision_on_quantised_maps():
    from sklearn.metrics import average_precision_score

    from napari_retina.metrics import PixelPR

    rng = np.random.default_rng(0)
    acc, probs, gts = PixelPR(), [], []
    for _ in range(3):  # pooled over images, as the challenge does
        gt = rng.random((40, 50)) < 0.1
        prob = np.clip(0.35 * gt + rng.random((40, 50)) * 0.7, 0, 1)
        q = (prob * 255).round().astype(np.uint8)  # what a _prob.tif stores
        acc.add(q, gt)
        probs.append(q.ravel()), gts.append(gt.ravel())
    want = average_precision_score(np.concatenate(gts), np.concatenate(probs))
    assert acc.aupr() == pytest.approx(want, abs=1e-12)
    assert acc.images == 3


def test_pixel_figures_at_a_threshold_by_hand():
    from napari_retina.metrics import PixelPR

    prob = np.array([[0.9, 0.8, 0.2, 0.6], [0.1, 0.7, 0.4, 0.0]])
    gt = np.array([[1, 1, 1, 0], [0, 0, 1, 0]], bool)
    acc = PixelPR()
    acc.add(prob, gt)
    f = acc.at_threshold(0.5)  # predicted: 0.9 0.8 0.6 0.7 -> tp 2, fp 2, fn 2, tn 2
    assert (f["precision"], f["recall"], f["specificity"]) == (0.5, 0.5, 0.5)
    assert f["f1"] == pytest.approx(0.5) and f["iou"] == pytest.approx(2 / 6) and f["sensitivity"] == f["recall"]
    # only the field of view counts
    region = np.ones_like(gt)
    region[:, 3] = False
    acc2 = PixelPR()
    acc2.add(prob, gt, region=region)
    assert acc2.at_threshold(0.5)["precision"] == pytest.approx(2 / 3)


def test_aupr_is_one_for_a_perfect_map_and_nan_without_lesions():
    from napari_retina.metrics import PixelPR

    gt = np.zeros((10, 10), bool)
    gt[2:4, 2:5] = True
    acc = PixelPR()
    acc.add(gt.astype(np.float32) * 0.9, gt)
    assert acc.aupr() == pytest.approx(1.0)
    empty = PixelPR()
    empty.add(np.full((5, 5), 0.3), np.zeros((5, 5), bool))
    assert np.isnan(empty.aupr())


def test_lesions_touch_with_eight_connectivity():
    from napari_retina.metrics import lesion_counts

    gt = np.zeros((12, 12), bool)
    gt[1:3, 1:3] = True  # lesion A
    gt[8, 8] = True  # lesion B
    gt[9, 9] = True  # diagonal neighbour: the same lesion B under 8-connectivity
    pred = np.zeros_like(gt)
    pred[2:5, 2:5] = True  # overlaps A by one pixel
    pred[0, 10] = True  # touches nothing
    assert lesion_counts(pred, gt) == (1, 1, 1, 2)
    pred[9, 9] = True
    assert lesion_counts(pred, gt) == (2, 1, 2, 2)


def test_lesion_summary_pools_and_averages_per_image():
    from napari_retina.metrics import summarise_lesion_counts

    s = summarise_lesion_counts([(3, 1, 2, 4), (0, 2, 0, 1)])
    assert s["lesion_precision"] == pytest.approx(3 / 6)
    assert s["lesion_sensitivity"] == pytest.approx(2 / 5)
    assert s["fp_per_image"] == pytest.approx(1.5)
    assert s["lesion_precision_per_image"] == pytest.approx((0.75 + 0.0) / 2)
    assert s["lesion_sensitivity_per_image"] == pytest.approx((0.5 + 0.0) / 2)


def test_froc_by_hand():
    from napari_retina.metrics import LesionFROC

    froc = LesionFROC(candidate_threshold=0.1)
    # image 1: two lesions; candidates: 0.9 on lesion 1, 0.8 elsewhere (FP), 0.3 on lesion 2
    gt1 = np.zeros((20, 20), bool)
    gt1[2:4, 2:4] = gt1[10:12, 10:12] = True
    p1 = np.zeros((20, 20), np.float32)
    p1[2:4, 2:4], p1[15:17, 2:4], p1[10:12, 10:12] = 0.9, 0.8, 0.3
    # image 2: one lesion, candidate 0.5 on it, 0.6 elsewhere (FP)
    gt2 = np.zeros((20, 20), bool)
    gt2[5:7, 5:7] = True
    p2 = np.zeros((20, 20), np.float32)
    p2[5:7, 5:7], p2[15:18, 15:18] = 0.5, 0.6
    froc.add(p1, gt1)
    froc.add(p2, gt2)
    th, fps, sens = froc.curve()
    # score order 0.9 (TP), 0.8 (FP), 0.6 (FP), 0.5 (TP), 0.3 (TP)
    np.testing.assert_allclose(th, [0.9, 0.8, 0.6, 0.5, 0.3])
    np.testing.assert_allclose(fps, [0, 0.5, 1.0, 1.0, 1.0])
    np.testing.assert_allclose(sens, [1 / 3, 1 / 3, 1 / 3, 2 / 3, 1.0])
    pts = froc.points()
    assert pts["0.125"] == pytest.approx(1 / 3) and pts["0.5"] == pytest.approx(1 / 3) and pts["1"] == pytest.approx(1.0)
    assert froc.score() == pytest.approx((1 / 3 * 3 + 1.0 * 4) / 7)


def test_froc_ranks_saturated_candidates_by_their_mean_probability():
    from napari_retina.metrics import LesionFROC

    # a confident model: every candidate peaks at 255 in the stored uint8 map
    gt = np.zeros((30, 30), bool)
    gt[2:6, 2:6] = True
    q = np.zeros((30, 30), np.uint8)
    q[2:6, 2:6] = 240
    q[3, 3] = 255  # the true lesion: high all over
    for r, v in ((12, 40), (20, 50)):  # two false ones: one saturated pixel in a faint blob
        q[r : r + 4, 20:24] = v
        q[r + 1, 21] = 255
    froc = LesionFROC(candidate_threshold=0.1)
    froc.add(q, gt)
    th, fps, sens = froc.curve()
    # without the tie-break all three would enter at once (1 TP, 2 FP): no point below 2 FP per image
    np.testing.assert_allclose(fps, [0.0, 1.0, 2.0])
    np.testing.assert_allclose(sens, [1.0, 1.0, 1.0])
    assert froc.points()["0.125"] == 1.0
