"""Scoring a model (with whatever adapters are active) on a data split: task metrics, and the mean
loss that the training loop tracks on held-out data.

With several processes each scores its share of the examples and the results are gathered. Shares are
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
from ..generate import generate_texts
from .distributed import Parallel
from .encoding import format_prompt
from .examples import CLASSIFICATION, IGNORE_INDEX, ClassExample, DataSplit, Example
from .metrics import classification_metrics, generation_metrics


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
    """Mean loss over all target tokens of `features` (for classification: over examples)."""
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
        else:
            per_example, terms = F.cross_entropy(logits, labels, reduction="none"), torch.ones_like(labels)
        keep = torch.arange(start, start + len(labels), device=device) < real  # padding examples count for nothing
        total += float(per_example[keep].sum())
        count += int(terms[keep].sum())
    model.train(was_training)
    loss_sum, term_count = parallel.sum(total, count)
    return loss_sum / max(term_count, 1)


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer, examples: Sequence, max_length: int, batch_size: int = 32) -> list[int]:
    was_training = model.training
    model.eval()
    predictions: list[int] = []
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
        predictions += model(**to_device(enc, model_device(model))).logits.argmax(-1).tolist()
    model.train(was_training)
    return predictions


def evaluate_split(
    model: nn.Module,
    tokenizer,
    split: DataSplit,
    max_length: int = 256,
    max_new_tokens: int = 64,
    batch_size: int = 16,
    progress: bool = False,
    parallel: Parallel | None = None,
) -> tuple[dict[str, float], list]:
    """Task metrics of the model on `split`, and its predictions (texts or label ids)."""
    parallel = parallel or Parallel()
    examples, real = _share(split.examples, parallel)
    if split.task == CLASSIFICATION:
        labels = predict_labels(model, tokenizer, examples, max_length, batch_size)
        predictions = _gather_in_order(labels, real, parallel)
        references = [e.label for e in cast(list[ClassExample], split.examples)]
        return classification_metrics(predictions, references, split.num_labels), predictions
    prompts = [format_prompt(tokenizer, e.prompt) for e in examples]
    generated = generate_texts(
        model,
        tokenizer,
        prompts,
        max_new_tokens,
        batch_size,
        progress=progress and parallel.is_main,
        synced=parallel.mode == "fsdp",
    )
    texts = _gather_in_order(generated, real, parallel)
    return generation_metrics(texts, [e.references for e in cast(list[Example], split.examples)]), texts
