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
