"""Offline evaluation metrics: corpus-level text-generation scores and classification scores.

Generation follows the E2E challenge's conventions where the libraries allow it: corpus-level scores,
every reference of an input counted, case-insensitive (the official E2E scorer lower-cases by default,
so all texts are lower-cased here), mteval-v13a tokenization (sacrebleu's "13a") for BLEU and NIST.

- BLEU: sacrebleu, 4-gram, brevity penalty, no smoothing (as the E2E scorer). 0-100.
- NIST: nltk's corpus_nist with 5-grams on 13a tokens. Raw value. nltk scores each sentence against
  its single best reference per n-gram order, so it is close to, not identical with, mteval's NIST.
- chrF: sacrebleu defaults (character 6-grams, beta 2). 0-100.
- ROUGE-L: rouge-score F-measure (beta 1) of each hypothesis against its best reference, averaged over
  the corpus. 0-100. The COCO scorer used by E2E takes the best precision and best recall separately
  with beta 1.2 and PTB tokenization, so its values differ slightly.

Classification: accuracy, F1 (binary for two labels, else macro) and Matthews correlation, from
scikit-learn, all on a 0-100 scale. Nothing here downloads anything.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Any

from nltk.translate.nist_score import corpus_nist
from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a
from sklearn.metrics import accuracy_score, f1_score, matthews_corrcoef

NIST_ORDER = 5


def generation_metrics(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> dict[str, float]:
    """BLEU, NIST, chrF and ROUGE-L of the hypotheses, each against all of its references
    (any number per item, at least one). Keys: bleu, nist, chrf, rouge_l."""
    if len(hypotheses) != len(references):
        raise ValueError(f"{len(hypotheses)} hypotheses but {len(references)} reference lists")
    if not hypotheses:
        raise ValueError("no hypotheses to score")
    if any(len(refs) == 0 for refs in references):
        raise ValueError("every hypothesis needs at least one reference")

    hyps = [h.lower() for h in hypotheses]
    refs = [[r.lower() for r in group] for group in references]
    # sacrebleu reads one stream per reference position; None stands for "this item has fewer references".
    width = max(len(group) for group in refs)
    streams: list[list[Any]] = [[group[i] if i < len(group) else None for group in refs] for i in range(width)]

    return {
        "bleu": BLEU(smooth_method="none").corpus_score(hyps, streams).score,
        "nist": float(_nist(hyps, refs)),
        "chrf": CHRF().corpus_score(hyps, streams).score,
        "rouge_l": _rouge_l(hyps, refs),
    }


def _nist(hyps: list[str], refs: list[list[str]]) -> float:
    tokenize = Tokenizer13a()
    hyp_tokens = [tokenize(h).split() for h in hyps]
    ref_tokens = [[tokenize(r).split() for r in group] for group in refs]
    # nltk divides by zero for an n-gram order that no hypothesis is long enough to have; such an
    # order carries no information, so stop at the longest hypothesis.
    order = min(NIST_ORDER, max(len(h) for h in hyp_tokens))
    return corpus_nist(ref_tokens, hyp_tokens, n=order) if order else 0.0


def _rouge_l(hyps: list[str], refs: list[list[str]]) -> float:
    scorer = RougeScorer(["rougeL"], use_stemmer=False)
    best = [scorer.score_multi(group, hyp)["rougeL"].fmeasure for hyp, group in zip(hyps, refs)]
    return 100 * sum(best) / len(best)


def classification_metrics(
    predictions: Sequence[int], labels: Sequence[int], num_labels: int | None = None
) -> dict[str, float]:
    """accuracy, f1 and mcc, 0-100. F1 is binary (positive class 1) when there are two labels
    (num_labels == 2, or, without num_labels, when all values are 0 or 1), macro-averaged otherwise."""
    if len(predictions) != len(labels):
        raise ValueError(f"{len(predictions)} predictions but {len(labels)} labels")
    if not labels:
        raise ValueError("no predictions to score")
    binary = num_labels == 2 if num_labels is not None else set(predictions) | set(labels) <= {0, 1}
    return {
        "accuracy": 100 * float(accuracy_score(labels, predictions)),
        "f1": 100 * float(f1_score(labels, predictions, average="binary" if binary else "macro", zero_division=0)),
        "mcc": 100 * float(matthews_corrcoef(labels, predictions)),
    }
