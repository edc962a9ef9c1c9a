"""Which of an input's references a generation data set trains on (`--references`).

Crowd-sourced data-to-text sets give each input several references (E2E: 8.7 on average per meaning
representation) that say the same thing in different words. Trained on every (input, reference) row, a model
sees one input with conflicting targets and learns their blend; scored against all references (BLEU as the E2E
challenge computes it), the most typical wording is worth most. `central` keeps one row per input, its
**central reference**: the one with the highest sentence BLEU against the input's other references,

    central(R) = argmax_{r ∈ R} BLEU_sentence(r, R \\ {r})     (sacrebleu, lower-cased, exponential smoothing),

ties to the first. It is chosen on the training data alone, so no evaluation data is involved. On E2E it raised the
default run's BLEU by about 1 (validation, and the whole test set with beam 10: 63.8 to 64.8); over the whole
training set it trains on 4,862 rows instead of 42,061, and scored 64.6 on the test set against 65.5 for one
epoch of every row (docs/results.md).
"""

from __future__ import annotations

from collections.abc import Hashable, Sequence
from dataclasses import replace

from sacrebleu.metrics import BLEU

from .examples import DataError, DataSplit, Example, Prompt

REFERENCE_CHOICES = ("all", "central")


def central_reference(references: Sequence[str]) -> str:
    """The reference with the highest sentence BLEU (lower-cased, smoothed) against the other ones: the most
    typical wording (a lone reference is its own choice; ties go to the first)."""
    if not references:
        raise ValueError("central_reference needs at least one reference")
    if len(references) == 1:
        return references[0]
    metric = BLEU(smooth_method="exp", lowercase=True, effective_order=True)
    others = [list(references[:i]) + list(references[i + 1 :]) for i in range(len(references))]
    scores = [metric.sentence_score(ref, rest).score for ref, rest in zip(references, others)]
    return references[max(range(len(references)), key=scores.__getitem__)]


def _key(prompt: Prompt) -> Hashable:
    return prompt if isinstance(prompt, str) else tuple(tuple(sorted(turn.items())) for turn in prompt)


def central_examples(examples: Sequence[Example]) -> list[Example]:
    """One example per distinct prompt, in order of first appearance, whose target is the central reference
    among the targets of that prompt's rows (each row is one reference; a repeated one counts as often as it
    appears), and whose `references` are those targets."""
    groups: dict[Hashable, tuple[Example, list[str]]] = {}
    for example in examples:
        groups.setdefault(_key(example.prompt), (example, []))[1].append(example.target)
    return [replace(first, target=central_reference(texts), references=texts) for first, texts in groups.values()]


def choose_references(split: DataSplit, choice: str) -> DataSplit:
    """The training split `--references choice` asks for: as it is, or `central_examples` of it."""
    if choice not in REFERENCE_CHOICES:
        raise DataError(f"--references must be one of {', '.join(REFERENCE_CHOICES)}, not {choice!r}")
    if choice == "all":
        return split
    texts = [example for example in split.examples if isinstance(example, Example)]
    if len(texts) < len(split.examples):
        raise DataError("--references central applies to generation data (inputs with reference texts)")
    return replace(split, examples=central_examples(texts))
