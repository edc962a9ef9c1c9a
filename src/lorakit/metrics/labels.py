"""Scores of predicted labels and predicted values, on a 0-100 scale (as GLUE reports them).

- Classification (scikit-learn): accuracy; F1, binary (positive class 1) for a two-label task, else the macro
  mean over labels; Matthews correlation (`mcc`, GLUE's CoLA metric; -100 to 100).
- Regression (scipy): Pearson and Spearman correlation of the predicted and the true values (GLUE's STS-B
  metrics; -100 to 100). A constant prediction or target has no correlation: scipy gives nan (with a warning),
  reported as is.
"""

from __future__ import annotations

from collections.abc import Collection

from scipy.stats import pearsonr, spearmanr
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

from .base import Scored


def classification_scores(scored: Scored, names: Collection[str]) -> dict[str, float]:
    """accuracy, f1 and mcc (those named). F1 is binary when num_labels is 2, or, without num_labels, when every
    value is 0 or 1; macro-averaged otherwise."""
    predictions, labels, num_labels = scored.checked(texts=False)
    binary = num_labels == 2 if num_labels is not None else set(predictions) | set(labels) <= {0, 1}
    compute = {
        "accuracy": lambda: accuracy_score(labels, predictions),
        "f1": lambda: f1_score(labels, predictions, average="binary" if binary else "macro", zero_division=0),
        "mcc": lambda: matthews_corrcoef(labels, predictions),
    }
    return {name: 100 * float(compute[name]()) for name in names}


def regression_scores(scored: Scored, names: Collection[str]) -> dict[str, float]:
    """pearson and spearman (those named) of the predicted values against the targets."""
    predictions, targets, _ = scored.checked(texts=False)
    if len(predictions) < 2:
        raise ValueError("a correlation needs at least 2 scored examples")
    compute = {"pearson": pearsonr, "spearman": spearmanr}
    return {name: 100 * float(compute[name](predictions, targets).statistic) for name in names}
