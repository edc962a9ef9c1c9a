"""Scoring model outputs as the papers and the official scorers do: which metrics a task reports, each metric's
implementation, and the metrics that cannot run on this machine (skipped, with the reason).

- registry.py: the one map of metric names to families and implementations, each task's defaults, `score`;
- text.py: BLEU, NIST (nist.py: mteval-v13a), chrF, ROUGE-1/2/L, exact match of generated text;
- coco.py: METEOR and CIDEr (pycocoevalcap and Java; optional);
- labels.py: accuracy, F1, MCC of labels; Pearson and Spearman of values;
- base.py: the scored outputs (`Scored`) and `MetricUnavailable`.
"""

from .base import MetricUnavailable, Scored
from .registry import (
    DEFAULT_METRICS,
    DEFAULTS_TEXT,
    METRICS,
    METRICS_HELP,
    Scores,
    check_known,
    implementation,
    metrics_for,
    score,
)

__all__ = [
    "DEFAULTS_TEXT",
    "DEFAULT_METRICS",
    "METRICS",
    "METRICS_HELP",
    "MetricUnavailable",
    "Scored",
    "Scores",
    "check_known",
    "implementation",
    "metrics_for",
    "score",
]
