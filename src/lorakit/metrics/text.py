"""Text-overlap metrics of generated text: BLEU, NIST, chrF, ROUGE-1/2/L and exact match.

Conventions, those of the E2E challenge's official scorer where it defines them: corpus-level scores, every
reference of an input counted (any number per input), case-insensitive (all texts lower-cased first).

- BLEU: sacrebleu, 4-gram, mteval-v13a tokenization, no smoothing, the closest reference length (ties: the
  shorter) for the brevity penalty — the E2E scorer's BLEU (its mteval-v13a). 0-100.
- NIST: `lorakit.metrics.nist` (mteval-v13a's NIST, 5-grams) on the same tokens. Raw value (about 2-10).
- chrF: sacrebleu's defaults (character 6-grams, beta 2), against every reference. 0-100.
- ROUGE-1/2/L: rouge-score F-measure (beta 1, its own tokenizer, no stemming) of each prediction against its
  best reference, averaged over the corpus. 0-100. The E2E scorer's ROUGE-L (COCO's, with PTB tokens and beta
  1.2) differs slightly; summarisation papers often stem (`use_stemmer=True`), which raises ROUGE a little.
- exact_match: the share of predictions equal to one of their references once case is folded and runs of
  whitespace are one space (ends stripped). 0-100.
"""

from __future__ import annotations

from collections.abc import Callable, Collection, Sequence
from typing import Any

from rouge_score.rouge_scorer import RougeScorer
from sacrebleu.metrics import BLEU, CHRF
from sacrebleu.tokenizers.tokenizer_13a import Tokenizer13a

from .base import Scored
from .nist import corpus_nist

ROUGE_TYPES = {"rouge_1": "rouge1", "rouge_2": "rouge2", "rouge_l": "rougeL"}


def reference_streams(references: Sequence[Sequence[str]]) -> list[list[Any]]:
    """sacrebleu's layout: one stream per reference position; None where an input has fewer references."""
    width = max(len(group) for group in references)
    return [[group[i] if i < len(group) else None for group in references] for i in range(width)]


def bleu(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return BLEU(smooth_method="none").corpus_score(list(hypotheses), reference_streams(references)).score


def chrf(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    return CHRF().corpus_score(list(hypotheses), reference_streams(references)).score


def nist(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    tokenize = Tokenizer13a()
    return corpus_nist(
        [tokenize(h).split() for h in hypotheses], [[tokenize(r).split() for r in group] for group in references]
    )


def rouge(hypotheses: Sequence[str], references: Sequence[Sequence[str]], names: Collection[str]) -> dict[str, float]:
    """The ROUGE F-measures named (rouge_1, rouge_2, rouge_l), best reference per item, corpus mean, 0-100."""
    kinds = {name: ROUGE_TYPES[name] for name in names}
    scorer = RougeScorer(list(kinds.values()), use_stemmer=False)
    per_item = [scorer.score_multi(group, hypothesis) for hypothesis, group in zip(hypotheses, references)]
    return {name: 100 * sum(item[kind].fmeasure for item in per_item) / len(per_item) for name, kind in kinds.items()}


def normalised(text: str) -> str:
    """Case folded, whitespace runs as one space, ends stripped: what exact match compares."""
    return " ".join(text.casefold().split())


def exact_match(hypotheses: Sequence[str], references: Sequence[Sequence[str]]) -> float:
    hits = sum(normalised(h) in {normalised(r) for r in group} for h, group in zip(hypotheses, references))
    return 100 * hits / len(hypotheses)


CORPUS_SCORES: dict[str, Callable[[Sequence[str], Sequence[Sequence[str]]], float]] = {
    "bleu": bleu,
    "nist": nist,
    "chrf": chrf,
    "exact_match": exact_match,
}


def text_scores(scored: Scored, names: Collection[str]) -> dict[str, float]:
    """The named metrics (keys of CORPUS_SCORES and ROUGE_TYPES) of generated texts, all lower-cased first."""
    scored.checked(texts=True)
    hypotheses = [h.lower() for h in scored.predictions]
    references = [[r.lower() for r in group] for group in scored.references]
    scores = {name: float(CORPUS_SCORES[name](hypotheses, references)) for name in names if name in CORPUS_SCORES}
    wanted_rouge = [name for name in names if name in ROUGE_TYPES]
    if wanted_rouge:
        scores.update(rouge(hypotheses, references, wanted_rouge))
    return scores
