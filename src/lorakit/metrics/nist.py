"""NIST (Doddington 2002) as NIST's `mteval-v13a` scorer computes it, with the variable number of references per
input that the E2E challenge's edited copy of that script (`mteval-v13a-sig.pl`, run by its `measure_scores.py`)
allows. Written here from that definition; nltk's `corpus_nist` differs (it weighs n-grams from each sentence's
references only), which is why its figures fell far below the official scorer's.

On tokens that are already normalised (see `lorakit.metrics.text`: lower-cased, mteval-v13a tokenization):

- Information weight of an n-gram w1..wn, from its counts over every reference of every input (the whole
  corpus): info = log2(count(w1..wn-1) / count(w1..wn)); for a unigram the numerator is the number of
  reference words.
- Per order n (1 to 5): the information of the hypothesis n-grams that a reference of the same input has, each
  counted at most as often as it occurs in one of them (the largest count among its references), summed over the
  corpus and divided by the number of hypothesis n-grams (at least 1).
- NIST = the sum of the five orders' values × the brevity penalty exp(-β log²(L_hyp / L_ref)) when L_hyp < L_ref
  (β = -ln 0.5 / ln² 1.5: a ratio of 2/3 halves the score), where L_hyp is the number of hypothesis words and
  L_ref the number of reference words divided by the mean number of (non-empty) references per input.
"""

from __future__ import annotations

import math
from collections import Counter
from collections.abc import Sequence

Tokens = Sequence[str]
NIST_ORDER = 5
# mteval's penalty: a hypothesis/reference length ratio of 1.5⁻¹ scores half.
BETA = -math.log(0.5) / math.log(1.5) ** 2


def ngram_counts(tokens: Tokens, order: int) -> Counter[tuple[str, ...]]:
    return Counter(tuple(tokens[i : i + order]) for i in range(len(tokens) - order + 1))


def information_weights(references: Sequence[Sequence[Tokens]], max_order: int = NIST_ORDER) -> dict:
    """log2(count(w1..wn-1) / count(w1..wn)) for every n-gram (n ≤ max_order) of the references, counted over all
    of them; n-grams that no reference has carry nothing and are absent."""
    counts: Counter[tuple[str, ...]] = Counter()
    words = 0
    for group in references:
        for reference in group:
            words += len(reference)
            for order in range(1, max_order + 1):
                counts.update(ngram_counts(reference, order))
    return {gram: math.log2((counts[gram[:-1]] if len(gram) > 1 else words) / n) for gram, n in counts.items()}


def length_penalty(ratio: float) -> float:
    """mteval's NIST brevity penalty of a hypothesis/reference length ratio."""
    if ratio >= 1:
        return 1.0
    if ratio <= 0:
        return 0.0
    return math.exp(-BETA * math.log(ratio) ** 2)


def corpus_nist(
    hypotheses: Sequence[Tokens], references: Sequence[Sequence[Tokens]], max_order: int = NIST_ORDER
) -> float:
    """Corpus-level NIST of tokenized hypotheses, each against all of its (one or more) tokenized references."""
    weights = information_weights(references, max_order)
    matched_info = [0.0] * max_order
    hypothesis_ngrams = [0] * max_order
    for hypothesis, group in zip(hypotheses, references):
        for order in range(1, max_order + 1):
            clip: Counter[tuple[str, ...]] = Counter()
            for reference in group:
                clip |= ngram_counts(reference, order)  # | keeps the larger count of each n-gram
            found = ngram_counts(hypothesis, order)
            matched_info[order - 1] += sum(
                weights[gram] * min(n, clip[gram]) for gram, n in found.items() if gram in clip
            )
            hypothesis_ngrams[order - 1] += max(0, len(hypothesis) - order + 1)
    score = sum(info / max(count, 1) for info, count in zip(matched_info, hypothesis_ngrams))
    reference_words = sum(len(reference) for group in references for reference in group)
    # mteval counts the references that are not empty (the E2E script pads an input's missing ones with "").
    references_per_input = sum(1 for group in references for reference in group if reference) / len(references)
    mean_reference_length = reference_words / references_per_input
    return score * length_penalty(hypothesis_ngrams[0] / mean_reference_length) if mean_reference_length else 0.0
