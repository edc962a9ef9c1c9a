"""The one place that knows the metrics: each name's family (the module that computes it), its implementation
(package, version and method, as results.json names it), the default metrics of each task, the check of a
`--metrics` list, and `score`, which computes a list of metrics and says which could not run here and why."""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from dataclasses import dataclass, field
from typing import Any, NamedTuple

from ..train.examples import CLASSIFICATION, GENERATION, REGRESSION
from . import coco
from .base import MetricUnavailable, Scored, package_version
from .labels import classification_scores, regression_scores
from .text import text_scores


class Family(NamedTuple):
    """Metrics computed together: the task whose outputs they score, and the function computing those named."""

    task: str
    compute: Callable[[Scored, Collection[str]], dict[str, float]]


TEXT = Family(GENERATION, text_scores)
COCO = Family(GENERATION, coco.coco_scores)
CLASSES = Family(CLASSIFICATION, classification_scores)
VALUES = Family(REGRESSION, regression_scores)


class Metric(NamedTuple):
    family: Family
    package: str  # the distribution that implements it (its version goes in the description)
    method: str


E2E_TOKENS = "lower-cased, mteval-v13a tokens, every reference of each input (as the E2E scorer)"
ROUGE = "F-measure, lower-cased, no stemming, best reference per input, corpus mean, x100"
COCO_TOKENS = "on PTB-tokenized text, every reference of each input (as the E2E scorer)"
METRICS: dict[str, Metric] = {
    "bleu": Metric(TEXT, "sacrebleu", f"corpus BLEU-4, no smoothing, closest reference length, {E2E_TOKENS}"),
    "nist": Metric(TEXT, "lorakit", f"mteval-v13a NIST, 5-grams, corpus information weights, {E2E_TOKENS}"),
    "meteor": Metric(COCO, coco.PACKAGE, f"METEOR 1.5 jar (-l en -norm) x100, {COCO_TOKENS}"),
    "rouge_l": Metric(TEXT, "rouge-score", f"ROUGE-L {ROUGE}"),
    "cider": Metric(COCO, coco.PACKAGE, f"CIDEr-D (sigma 6, n-grams 1-4), {COCO_TOKENS}"),
    "chrf": Metric(TEXT, "sacrebleu", "chrF (character 6-grams, beta 2), lower-cased, every reference"),
    "rouge_1": Metric(TEXT, "rouge-score", f"ROUGE-1 {ROUGE}"),
    "rouge_2": Metric(TEXT, "rouge-score", f"ROUGE-2 {ROUGE}"),
    "exact_match": Metric(TEXT, "lorakit", "equal to a reference after case folding and whitespace collapsing, x100"),
    "accuracy": Metric(CLASSES, "scikit-learn", "accuracy_score x100"),
    "f1": Metric(CLASSES, "scikit-learn", "f1_score x100, binary (positive label 1) for 2 labels, else macro"),
    "mcc": Metric(CLASSES, "scikit-learn", "matthews_corrcoef x100"),
    "pearson": Metric(VALUES, "scipy", "stats.pearsonr x100"),
    "spearman": Metric(VALUES, "scipy", "stats.spearmanr x100"),
}
DEFAULT_METRICS: dict[str, tuple[str, ...]] = {
    GENERATION: ("bleu", "nist", "meteor", "rouge_l", "cider", "chrf"),
    CLASSIFICATION: ("accuracy", "f1", "mcc"),
    REGRESSION: ("pearson", "spearman"),
}
METRICS_HELP = (
    "metrics to report, comma-separated, from: "
    + ", ".join(METRICS)
    + " (summaries: rouge_1,rouge_2,rouge_l; text-to-SQL: exact_match,bleu)"
)
DEFAULTS_TEXT = "; ".join(f"{task}: {','.join(names)}" for task, names in DEFAULT_METRICS.items())


def check_known(names: Sequence[str]) -> None:
    """A ValueError naming every unknown metric and listing the known ones."""
    unknown = [name for name in names if name not in METRICS]
    if unknown:
        raise ValueError(f"unknown metric(s) {', '.join(unknown)}; known: {', '.join(METRICS)}")


def metrics_for(task: str, names: Sequence[str] | None = None) -> tuple[str, ...]:
    """The metrics a task is scored with: `names` (checked: known, and of this task's outputs), else its defaults."""
    if task not in DEFAULT_METRICS:
        raise ValueError(f"no metrics for task {task!r}; tasks: {', '.join(DEFAULT_METRICS)}")
    if not names:
        return DEFAULT_METRICS[task]
    check_known(names)
    foreign = [name for name in names if METRICS[name].family.task != task]
    if foreign:
        fitting = [name for name, metric in METRICS.items() if metric.family.task == task]
        raise ValueError(f"metric(s) {', '.join(foreign)} do not score a {task} task; it takes: {', '.join(fitting)}")
    return tuple(dict.fromkeys(names))


def implementation(name: str) -> str:
    """What computes a metric: "package version: method"."""
    metric = METRICS[name]
    return f"{metric.package} {package_version(metric.package)}: {metric.method}"


@dataclass
class Scores:
    """The metrics computed (in the order asked), what computed each, and the ones skipped with the reason."""

    metrics: dict[str, float] = field(default_factory=dict)
    implementations: dict[str, str] = field(default_factory=dict)
    skipped: dict[str, str] = field(default_factory=dict)

    def report(self) -> dict[str, Any]:
        """results.json's and `lorakit eval --output`'s account of the scores."""
        return {"metric_implementations": self.implementations, "skipped_metrics": self.skipped}


def score(task: str, scored: Scored, names: Sequence[str] | None = None) -> Scores:
    """The task's metrics (`names`, else its defaults) of `scored`. Each family runs once, on all of its metrics;
    one that cannot run here (MetricUnavailable) has its metrics in `skipped` with the reason."""
    wanted = metrics_for(task, names)
    computed: dict[str, float] = {}
    skipped: dict[str, str] = {}
    families: dict[Family, list[str]] = {}
    for name in wanted:
        families.setdefault(METRICS[name].family, []).append(name)
    for family, members in families.items():
        try:
            computed.update(family.compute(scored, members))
        except MetricUnavailable as err:
            skipped.update(dict.fromkeys(members, str(err)))
    metrics = {name: computed[name] for name in wanted if name in computed}
    return Scores(metrics, {name: implementation(name) for name in metrics}, skipped)
