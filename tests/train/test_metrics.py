"""Metrics checked against hand computations and against nltk's independent BLEU."""

import math

import pytest
from nltk.translate.bleu_score import corpus_bleu

from lorakit.train.metrics import classification_metrics, generation_metrics

# Two items with a different number of references each (E2E has 1 to 16 per meaning representation).
HYPS = ["The cat sat on the mat .", "a dog"]
REFS = [["the cat is on the mat .", "there is a cat on the mat"], ["a dog barks"]]


def test_bleu_by_hand_with_variable_references_and_case():
    # Clipped n-gram matches over the corpus (max count over each item's references):
    # 1-grams 6+2 of 7+2, 2-grams 4+1 of 6+1, 3-grams 2+0 of 5+0, 4-grams 1+0 of 4+0.
    # Closest reference lengths 7 and 3 give r = 10 against c = 9 hypothesis tokens.
    precisions = [8 / 9, 5 / 7, 2 / 5, 1 / 4]
    expected = 100 * math.exp(1 - 10 / 9) * math.prod(precisions) ** 0.25
    assert generation_metrics(HYPS, REFS)["bleu"] == pytest.approx(expected, abs=1e-6)


def test_bleu_matches_nltk_corpus_bleu():
    # nltk counts a missing n-gram order as 0/1, so keep every hypothesis at least 4 tokens long.
    hyps = [
        "the vaults is a pub near the river",
        "a cheap family friendly coffee shop in the city centre",
        "green man serves english food",
    ]
    refs = [
        ["the vaults is a pub by the river", "near the river there is a pub called the vaults", "the vaults pub"],
        ["in the city centre is a cheap coffee shop that is family friendly"],
        ["the green man serves english food", "english food is served at green man"],
    ]
    expected = 100 * corpus_bleu([[r.split() for r in group] for group in refs], [h.split() for h in hyps])
    assert generation_metrics(hyps, refs)["bleu"] == pytest.approx(expected, abs=1e-6)


def test_nist_by_hand():
    # One reference of n distinct words, repeated exactly: each unigram carries log2(n / 1) bits and every
    # longer n-gram log2(1 / 1) = 0 bits, and lengths match, so NIST = log2(n).
    assert generation_metrics(["a b c d e f"], [["a b c d e f"]])["nist"] == pytest.approx(math.log2(6))
    # Hypotheses shorter than 5 tokens: orders nobody reaches are skipped, not divided by zero.
    assert generation_metrics(["a b"], [["a b"]])["nist"] == pytest.approx(1.0)


def test_chrf_extremes():
    assert generation_metrics(["Green Man"], [["green man"]])["chrf"] == pytest.approx(100.0)
    assert generation_metrics(["xyz"], [["abc"]])["chrf"] == pytest.approx(0.0)


def test_rouge_l_by_hand_best_reference_then_mean():
    hyps = ["The cat sat on the mat", "a small dog barks"]
    refs = [["the cat was on a mat", "a dog"], ["the dog barks loudly"]]
    # LCS "the cat on mat" = 4 of 6 and 6 tokens -> F 2/3 (the other reference scores 0);
    # LCS "dog barks" = 2 of 4 and 4 tokens -> F 1/2.
    assert generation_metrics(hyps, refs)["rouge_l"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        (["a"], [["a"], ["b"]], "1 hypotheses but 2"),
        ([], [], "no hypotheses"),
        (["a", "b"], [["a"], []], "at least one reference"),
    ],
)
def test_generation_metrics_reject_bad_input(hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        generation_metrics(hyps, refs)


def test_binary_classification_by_hand():
    # TP 2, FP 2, TN 2, FN 0.
    scores = classification_metrics([1, 0, 1, 1, 0, 1], [1, 0, 0, 1, 0, 0])
    assert scores["accuracy"] == pytest.approx(100 * 4 / 6)
    assert scores["f1"] == pytest.approx(100 * 2 * 2 / (2 * 2 + 2 + 0))
    assert scores["mcc"] == pytest.approx(100 * (2 * 2 - 2 * 0) / math.sqrt(4 * 2 * 4 * 2))


def test_multiclass_classification_by_hand():
    preds = [0, 1, 2, 2, 1, 0]
    labels = [0, 1, 2, 1, 1, 2]
    scores = classification_metrics(preds, labels)
    assert scores["accuracy"] == pytest.approx(100 * 4 / 6)
    # Per-class F1 = 2TP / (2TP + FP + FN): class 0: 2/3, class 1: 4/5, class 2: 2/4.
    assert scores["f1"] == pytest.approx(100 * (2 / 3 + 4 / 5 + 2 / 4) / 3)
    # Multi-class MCC: (c*s - sum p_k t_k) / sqrt((s^2 - sum p_k^2)(s^2 - sum t_k^2)),
    # c = 4 correct, s = 6, predicted counts p = (2, 2, 2), true counts t = (1, 3, 2).
    assert scores["mcc"] == pytest.approx(100 * (4 * 6 - (2 + 6 + 4)) / math.sqrt((36 - 12) * (36 - 14)))


def test_binary_f1_with_no_positive_prediction_is_zero():
    assert classification_metrics([0, 0], [0, 1], num_labels=2)["f1"] == 0.0


def test_classification_metrics_reject_bad_input():
    with pytest.raises(ValueError, match="2 predictions but 1 labels"):
        classification_metrics([0, 1], [0])
    with pytest.raises(ValueError, match="no predictions"):
        classification_metrics([], [])
