"""Scoring a model (with whatever adapters are active) on a data split: its predictions (generated texts, label
ids, or regression values: the model's single output) scored with the task's metrics (`lorakit.metrics`), and
the mean loss that the training loop tracks on held-out data.

With several processes each predicts its share of the examples and the predictions are gathered; only the main
process computes the metrics (the others get none: a metric may run a Java tool, once is enough). Shares are
padded to equal length so that every process runs the same number of forward passes, which an
FSDP-sharded model needs (each forward is a collective). Batches go to the model's device; the caller
chooses the precision (`lorakit.device.autocast` around these calls).
"""

from __future__ import annotations

import math
from collections.abc import Callable, Sequence
from typing import cast

import torch
import torch.nn.functional as F
from torch import nn

from ..device import model_device, to_device
from ..generate import GREEDY, Decoding, generate_texts
from ..metrics import Scored, Scores, metrics_for, score
from .distributed import Parallel
from .encoding import format_prompt
from .examples import GENERATION, IGNORE_INDEX, REGRESSION, ClassExample, DataSplit, Example


def _share(items: Sequence, parallel: Parallel) -> tuple[list, int]:
    """This process's items (every world-th, from its rank), padded to the common length; and how many are real."""
    part = list(items[parallel.rank :: parallel.world])
    real = len(part)
    size = math.ceil(len(items) / parallel.world)
    return part + [items[0]] * (size - real), real


def _gather_in_order(values: list, real: int, parallel: Parallel) -> list:
    mine = [(parallel.rank + k * parallel.world, v) for k, v in enumerate(values[:real])]
    return [v for _, v in sorted(parallel.gather(mine), key=lambda pair: pair[0])]


@torch.no_grad()
def mean_loss(
    model: nn.Module,
    features: Sequence[dict],
    collate: Callable,
    batch_size: int = 16,
    parallel: Parallel | None = None,
) -> float:
    """Mean loss over all target tokens of `features` (classification: cross-entropy over examples; regression:
    squared error over examples, as transformers' own loss for one output)."""
    parallel = parallel or Parallel()
    part, real = _share(features, parallel)
    was_training = model.training
    model.eval()
    total, count = 0.0, 0
    device = model_device(model)
    for start in range(0, len(part), batch_size):
        batch = to_device(collate(part[start : start + batch_size]), device)
        labels = batch.pop("labels")
        logits = model(**batch).logits.float()
        if labels.dim() == 2:  # causal LM: token t predicts token t + 1
            labels = labels[:, 1:]
            losses = F.cross_entropy(
                logits[:, :-1].transpose(1, 2), labels, ignore_index=IGNORE_INDEX, reduction="none"
            )
            per_example, terms = losses.sum(1), (labels != IGNORE_INDEX).sum(1)
        elif labels.is_floating_point():  # regression targets
            per_example, terms = (logits[:, 0] - labels) ** 2, torch.ones_like(labels, dtype=torch.long)
        else:
            per_example, terms = F.cross_entropy(logits, labels, reduction="none"), torch.ones_like(labels)
        keep = torch.arange(start, start + len(labels), device=device) < real  # padding examples count for nothing
        total += float(per_example[keep].sum())
        count += int(terms[keep].sum())
    model.train(was_training)
    loss_sum, term_count = parallel.sum(total, count)
    return loss_sum / max(term_count, 1)


@torch.no_grad()
def predict_labels(
    model: nn.Module, tokenizer, examples: Sequence, max_length: int | None, batch_size: int = 32, values: bool = False
) -> list:
    """The label id the model gives each example (its largest logit), or with `values` its single output."""
    was_training = model.training
    model.eval()
    predictions: list = []
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pairs = [e.text_pair for e in chunk]
        enc = tokenizer(
            [e.text for e in chunk],
            pairs if any(p is not None for p in pairs) else None,
            truncation=True,
            max_length=max_length,
            padding=True,
            return_tensors="pt",
        )
        logits = model(**to_device(enc, model_device(model))).logits
        predictions += logits[:, 0].float().tolist() if values else logits.argmax(-1).tolist()
    model.train(was_training)
    return predictions


def evaluate_split(
    model: nn.Module,
    tokenizer,
    split: DataSplit,
    max_length: int | None = 256,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    parallel: Parallel | None = None,
    metrics: Sequence[str] | None = None,
    decoding: Decoding = GREEDY,
) -> tuple[Scores, list]:
    """The model's predictions on `split` (texts generated with `decoding`, label ids, or values) scored with
    `metrics` (else the task's defaults; names that do not fit the task are refused before anything runs)."""
    parallel = parallel or Parallel()
    names = metrics_for(split.task, metrics)
    examples, real = _share(split.examples, parallel)
    if split.task != GENERATION:
        outputs = predict_labels(model, tokenizer, examples, max_length, batch_size, values=split.task == REGRESSION)
        predictions = _gather_in_order(outputs, real, parallel)
        if not parallel.is_main:
            return Scores(), predictions
        labels = [e.label for e in cast(list[ClassExample], split.examples)]
        return score(split.task, Scored(predictions, labels, split.num_labels), names), predictions
    prompts = [format_prompt(tokenizer, e.prompt) for e in examples]
    generated = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        decoding,
        progress=progress and parallel.is_main,
        synced=parallel.mode == "fsdp",
    )
    texts = _gather_in_order(generated, real, parallel)
    if not parallel.is_main:
        return Scores(), texts
    references = [e.references for e in cast(list[Example], split.examples)]
    return score(split.task, Scored(texts, references), names), texts
