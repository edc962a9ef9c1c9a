"""Classification and regression scores checked against their formulas (written out, in float64)."""

import math

import numpy as np
import pytest

from lorakit.metrics import Scored
from lorakit.metrics.labels import classification_scores, regression_scores

CLASS_METRICS = ("accuracy", "f1", "mcc")


def classified(predictions, labels, num_labels=None):
    return classification_scores(Scored(predictions, labels, num_labels), CLASS_METRICS)


def test_binary_classification_by_hand():
    # TP 2, FP 2, TN 2, FN 0.
    scores = classified([1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 0, 0])
    assert scores["accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["f1"] == pytest.approx(100 * 2 * 2 / (2 * 2 + 2 + 0))
    # MCC = (TP TN - FP FN) / sqrt((TP + FP)(TP + FN)(TN + FP)(TN + FN)).
    assert scores["mcc"] == pytest.approx(100 * (2 * 2 - 2 * 0) / math.sqrt(4 * 2 * 4 * 2))


def test_multiclass_classification_by_hand():
    preds = [0, 1, 2, 2, 1, 0]
    labels = [0, 1, 2, 1, 1, 2]
    scores = classified(preds, labels, num_labels=3)
    assert scores["accuracy"] == pytest.approx(100 * 4 / 6)
    # Per-class F1 = 2TP / (2TP + FP + FN): class 0: 2/3, class 1: 4/5, class 2: 2/4.
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 4 / 5 + 2 / 4) / 3)
    # Multi-class MCC: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)),
    # c = 4 correct, s = 6, predicted counts p = (2, 2, 2), true counts t = (1, 3, 2).
    assert scores["mcc"] == pytest.approx(100 * (4 * 6 - (2 + 6 + 4)) / math.sqrt((36 - 12) * (36 - 14)))


def test_binary_f1_with_no_positive_prediction_is_zero():
    assert classified([0, 0], [0, 1], num_labels=2)["f1"] == 0.0


def test_classification_scores_reject_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 references"):
        classified([0, 1], [0])
    with pytest.raises(ValueError, match="no predictions"):
        classified([], [])


def test_pearson_and_spearman_by_their_formulas():
    predicted = [0.5, 2.0, 1.0, 4.0, 3.5]
    targets = [1.0, 1.5, 1.5, 5.0, 2.0]
    x, y = np.array(predicted, dtype=np.float64), np.array(targets, dtype=np.float64)
    # Pearson: covariance over the product of the standard deviations.
    dx, dy = x - x.mean(), y - y.mean()
    pearson = (dx * dy).sum() / math.sqrt((dx**2).sum() * (dy**2).sum())
    # Spearman: Pearson of the ranks; the tied targets 1.5, 1.5 share ranks 2 and 3 -> 2.5 each.
    rank_x, rank_y = np.array([1, 3, 2, 5, 4.0]), np.array([1, 2.5, 2.5, 5, 4.0])
    rx, ry = rank_x - rank_x.mean(), rank_y - rank_y.mean()
    spearman = (rx * ry).sum() / math.sqrt((rx**2).sum() * (ry**2).sum())
    scores = regression_scores(Scored(predicted, targets), ("pearson", "spearman"))
    assert scores["pearson"] == pytest.approx(100 * pearson, rel=1e-12)
    assert scores["spearman"] == pytest.approx(100 * spearman, rel=1e-12)


def test_a_correlation_needs_two_examples():
    with pytest.raises(ValueError, match="at least 2"):
        regression_scores(Scored([1.0], [2.0]), ("pearson",))
