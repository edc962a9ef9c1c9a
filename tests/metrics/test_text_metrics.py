"""Text-overlap metrics checked against hand computations (the arithmetic written out) and against nltk's
independent BLEU."""

import math

import pytest
from nltk.translate.bleu_score import corpus_bleu

from lorakit.metrics import Scored
from lorakit.metrics.nist import corpus_nist
from lorakit.metrics.text import text_scores

ALL = ("bleu", "nist", "chrf", "rouge_1", "rouge_2", "rouge_l", "exact_match")


def scores(hyps, refs, *names):
    return text_scores(Scored(hyps, refs), names or ALL)


# Two items with a different number of references each (E2E has 1 to 16 per meaning representation).
HYPS = ["The cat sat on the mat .", "a dog"]
REFS = [["the cat is on the mat .", "there is a cat on the mat"], ["a dog barks"]]


def test_bleu_by_hand_with_variable_references_and_case():
    # Clipped n-gram matches over the corpus (max count over each item's references):
    # 1-grams 6+2 of 7+2, 2-grams 4+1 of 6+1, 3-grams 2+0 of 5+0, 4-grams 1+0 of 4+0.
    # Closest reference lengths 7 and 3 give r = 10 against c = 9 hypothesis tokens.
    precisions = [8 / 9, 5 / 7, 2 / 5, 1 / 4]
    expected = 100 * math.exp(1 - 10 / 9) * math.prod(precisions) ** 0.25
    assert scores(HYPS, REFS, "bleu")["bleu"] == pytest.approx(expected, abs=1e-6)


def test_bleu_takes_the_shorter_of_two_equally_close_references_as_mteval():
    # c = 4; references of 3 and 5 tokens are both 1 away: mteval-v13a (and the E2E scorer) takes 3, so c > r and
    # there is no brevity penalty; every n-gram of the hypothesis is in the longer reference: BLEU 100.
    # (Taking 5 would give 100 * exp(1 - 5/4) = 77.9.)
    assert scores(["a b c d"], [["a b c", "a b c d e"]], "bleu")["bleu"] == pytest.approx(100.0)


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
    assert scores(hyps, refs, "bleu")["bleu"] == pytest.approx(expected, abs=1e-6)


def test_nist_by_hand_with_corpus_information_weights():
    hyps = [["a", "b", "c"], ["a", "d"]]
    refs = [[["a", "b", "c"], ["a", "b", "d"]], [["a", "c"]]]
    # Counts over ALL 3 references (8 words): a 3, b 2, c 2, d 1; (a b) 2, (b c) 1, (b d) 1, (a c) 1;
    # (a b c) 1, (a b d) 1. Information: info(w) = log2(8 / count(w)); info(u v) = log2(count(u) / count(u v)):
    # a log2(8/3), b 2, c 2, d 3; (a b) log2(3/2), (b c) log2(2/1) = 1, (a c) log2(3); (a b c) log2(2/1) = 1.
    # Item 1 matches a, b, c; (a b), (b c); (a b c). Item 2 matches a only: d is in item 1's references, not its own.
    # Hypothesis n-grams: 5 unigrams, 3 bigrams, 1 trigram, no 4- or 5-grams (divided by max(0, 1)).
    unigrams = (2 * math.log2(8 / 3) + 2 + 2) / 5
    bigrams = (math.log2(3 / 2) + 1) / 3
    trigrams = 1 / 1
    # Length: 5 hypothesis words; reference length = 8 words / (3 references / 2 items) = 16/3; ratio 15/16.
    beta = -math.log(0.5) / math.log(1.5) ** 2
    penalty = math.exp(-beta * math.log(5 / (16 / 3)) ** 2)
    assert corpus_nist(hyps, refs) == pytest.approx((unigrams + bigrams + trigrams) * penalty, rel=1e-12)


def test_nist_clips_repeats_at_the_largest_count_in_one_reference():
    # References "a a b" and "a b b": a is clipped at 2 (not 1 + ... summed over references), b at 2.
    # 6 reference words: a 3, b 3 -> info(a) = info(b) = log2(6/3) = 1; hypothesis "a a a b" matches a twice, b once:
    # unigrams 3 bits / 4; bigrams: (a a) info log2(3/1), matched once; (a b) count 2 -> log2(3/2), matched once;
    # 3 hypothesis bigrams. Trigram (a a b) count 1 -> log2(count(a a) / 1) = 0. Length 4 >= 6 / 2: no penalty.
    expected = 3 / 4 + (math.log2(3) + math.log2(3 / 2)) / 3
    assert corpus_nist([["a", "a", "a", "b"]], [[["a", "a", "b"], ["a", "b", "b"]]]) == pytest.approx(expected)


def test_nist_of_simple_cases_through_the_tokenizer():
    # One reference of n distinct words, repeated exactly: each unigram carries log2(n / 1) bits and every
    # longer n-gram log2(1 / 1) = 0 bits, and lengths match, so NIST = log2(n).
    assert scores(["A b c d e f"], [["a b c d e f"]], "nist")["nist"] == pytest.approx(math.log2(6))
    assert scores(["a b"], [["a b"]], "nist")["nist"] == pytest.approx(1.0)


def test_chrf_extremes():
    assert scores(["Green Man"], [["green man"]], "chrf")["chrf"] == pytest.approx(100.0)
    assert scores(["xyz"], [["abc"]], "chrf")["chrf"] == pytest.approx(0.0)


def test_rouge_1_and_2_by_counting_ngrams():
    hyps = ["The cat sat on the mat", "a dog"]
    refs = [["the cat is on the mat", "a dog"], ["a dog barks"]]
    # Item 1, best reference "the cat is on the mat": unigrams the x2, cat, on, mat shared = 5 of 6 and 6 -> F 5/6;
    # bigrams (the cat), (on the), (the mat) shared = 3 of 5 and 5 -> F 3/5. The reference "a dog" shares nothing.
    # Item 2: unigrams 2 of 2 and 3 -> F 2 * 1 * 2/3 / (1 + 2/3) = 4/5; bigrams 1 of 1 and 2 -> F 2/3.
    result = scores(hyps, refs, "rouge_1", "rouge_2")
    assert result["rouge_1"] == pytest.approx(100 * (5 / 6 + 4 / 5) / 2)
    assert result["rouge_2"] == pytest.approx(100 * (3 / 5 + 2 / 3) / 2)


def test_rouge_l_by_hand_best_reference_then_mean():
    hyps = ["The cat sat on the mat", "a small dog barks"]
    refs = [["the cat was on a mat", "a dog"], ["the dog barks loudly"]]
    # LCS "the cat on mat" = 4 of 6 and 6 tokens -> F 2/3 (the other reference scores 0);
    # LCS "dog barks" = 2 of 4 and 4 tokens -> F 1/2.
    assert scores(hyps, refs, "rouge_l")["rouge_l"] == pytest.approx(100 * (2 / 3 + 1 / 2) / 2)


def test_exact_match_folds_case_and_whitespace_and_takes_any_reference():
    hyps = ["SELECT  name FROM t", "select x", " Select\tY from  T ", "b"]
    refs = [["select name from t"], ["select y"], ["SELECT y FROM t"], ["a", "B"]]
    # Matches: 1 (case, double space), not 2, 3 (tab, ends, case), 4 (its second reference): 3 of 4.
    assert scores(hyps, refs, "exact_match")["exact_match"] == pytest.approx(75.0)
    assert scores(["select name from t"], [["select name from t;"]], "exact_match")["exact_match"] == 0.0


@pytest.mark.parametrize(
    ("hyps", "refs", "message"),
    [
        (["a"], [["a"], ["b"]], "1 predictions but 2 references"),
        ([], [], "no predictions"),
        (["a", "b"], [["a"], []], "at least one reference"),
    ],
)
def test_text_metrics_reject_bad_input(hyps, refs, message):
    with pytest.raises(ValueError, match=message):
        scores(hyps, refs)
