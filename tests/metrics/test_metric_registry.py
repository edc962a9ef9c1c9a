"""The metric registry: each task's default metrics, `--metrics` lists (override, order, errors), the
implementation named for every reported metric, and metrics that cannot run here reported as skipped."""

from importlib.metadata import version

import pytest

from lorakit.metrics import DEFAULT_METRICS, METRICS, Scored, coco, metrics_for, score
from lorakit.train.data import CLASSIFICATION, GENERATION, REGRESSION

TEXTS = Scored(["the cat sat on the mat", "a dog"], [["the cat is on the mat"], ["a dog", "one dog"]])


def test_each_task_has_the_papers_metrics_by_default():
    assert metrics_for(GENERATION) == ("bleu", "nist", "meteor", "rouge_l", "cider", "chrf")
    assert metrics_for(CLASSIFICATION) == ("accuracy", "f1", "mcc")
    assert metrics_for(REGRESSION) == ("pearson", "spearman")
    assert set(DEFAULT_METRICS) == {GENERATION, CLASSIFICATION, REGRESSION}


def test_a_metrics_list_overrides_the_defaults_in_its_order_once_each():
    assert metrics_for(GENERATION, ["exact_match", "bleu", "exact_match"]) == ("exact_match", "bleu")
    result = score(GENERATION, TEXTS, ["rouge_2", "rouge_1", "rouge_l"])
    assert list(result.metrics) == ["rouge_2", "rouge_1", "rouge_l"]
    assert result.skipped == {}


def test_unknown_metrics_are_one_line_listing_the_known_ones():
    with pytest.raises(ValueError) as err:
        metrics_for(GENERATION, ["bleu", "blue", "rouge"])
    message = str(err.value)
    assert "\n" not in message
    assert message.startswith("unknown metric(s) blue, rouge; known: ")
    assert message.endswith(", ".join(METRICS))


def test_metrics_of_another_task_are_refused():
    with pytest.raises(ValueError, match="metric\\(s\\) bleu do not score a seq-cls task; it takes: accuracy, f1, mcc"):
        metrics_for(CLASSIFICATION, ["accuracy", "bleu"])
    with pytest.raises(ValueError, match="accuracy do not score a regression task; it takes: pearson, spearman"):
        metrics_for(REGRESSION, ["accuracy"])


def test_every_reported_metric_names_its_package_and_version():
    result = score(GENERATION, TEXTS, ["bleu", "nist", "rouge_l", "exact_match"])
    assert result.implementations["bleu"].startswith(f"sacrebleu {version('sacrebleu')}: ")
    assert result.implementations["rouge_l"].startswith(f"rouge-score {version('rouge-score')}: ")
    assert result.implementations["nist"].startswith(f"lorakit {version('lorakit')}: mteval-v13a NIST")
    assert set(result.implementations) == set(result.metrics)
    labels = score(CLASSIFICATION, Scored([0, 1, 1], [0, 1, 0], 2))
    assert labels.implementations["mcc"].startswith(f"scikit-learn {version('scikit-learn')}: matthews_corrcoef")
    values = score(REGRESSION, Scored([0.1, 0.5, 0.7], [1.0, 2.0, 2.5]))
    assert values.implementations["spearman"] == f"scipy {version('scipy')}: stats.spearmanr x100"


def test_without_the_coco_package_meteor_and_cider_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(coco, "PACKAGE", "no_such_package_for_lorakit")
    result = score(GENERATION, TEXTS)
    assert list(result.metrics) == ["bleu", "nist", "rouge_l", "chrf"]
    assert set(result.skipped) == {"meteor", "cider"}
    assert "pip install 'lorakit[coco]'" in result.skipped["meteor"]
    assert result.report() == {"metric_implementations": result.implementations, "skipped_metrics": result.skipped}


def test_without_java_meteor_and_cider_are_skipped_with_the_reason(monkeypatch):
    monkeypatch.setattr(coco, "PACKAGE", "sacrebleu")  # an installed package stands in for pycocoevalcap
    monkeypatch.setattr(coco, "JAVA", "no-such-java-for-lorakit")
    result = score(GENERATION, TEXTS, ["cider", "bleu"])
    assert list(result.metrics) == ["bleu"]
    assert result.skipped == {"cider": coco.unavailable()}
    assert "Java runtime" in result.skipped["cider"]
