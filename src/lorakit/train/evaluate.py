"""Scoring a model (with whatever adapters are active) on a data split: task metrics, and the mean
loss that the training loop tracks on held-out data."""

from __future__ import annotations

from collections.abc import Callable, Sequence

import torch
from torch import nn

from ..generate import generate_texts
from .data import CLASSIFICATION, DataSplit, format_prompt
from .metrics import classification_metrics, generation_metrics


@torch.no_grad()
def mean_loss(model: nn.Module, features: Sequence[dict], collate: Callable, batch_size: int = 16) -> float:
    """Token-weighted mean loss over `features` (for classification: example-weighted)."""
    was_training = model.training
    model.eval()
    total, weight = 0.0, 0
    for start in range(0, len(features), batch_size):
        batch = collate(list(features[start : start + batch_size]))
        labels = batch["labels"]
        count = int((labels[:, 1:] != -100).sum()) if labels.dim() == 2 else labels.numel()
        total += model(**batch).loss.item() * count
        weight += count
    model.train(was_training)
    return total / max(weight, 1)


@torch.no_grad()
def predict_labels(model: nn.Module, tokenizer, split: DataSplit, max_length: int, batch_size: int = 32) -> list[int]:
    was_training = model.training
    model.eval()
    predictions: list[int] = []
    examples = split.examples
    for start in range(0, len(examples), batch_size):
        chunk = examples[start : start + batch_size]
        pairs = [e.text_pair for e in chunk]
        enc = tokenizer(
            [e.text for e in chunk], pairs if any(p is not None for p in pairs) else None,
            truncation=True, max_length=max_length, padding=True, return_tensors="pt",
        )
        predictions += model(**enc).logits.argmax(-1).tolist()
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
) -> tuple[dict[str, float], list]:
    """Task metrics of the model on `split`, and its predictions (texts or label ids)."""
    if split.task == CLASSIFICATION:
        predictions = predict_labels(model, tokenizer, split, max_length, batch_size)
        metrics = classification_metrics(predictions, [e.label for e in split.examples], split.num_labels)
        return metrics, predictions
    prompts = [format_prompt(tokenizer, e.prompt) for e in split.examples]
    texts = generate_texts(model, tokenizer, prompts, max_new_tokens, batch_size, progress=progress)
    return generation_metrics(texts, [e.references for e in split.examples]), texts
