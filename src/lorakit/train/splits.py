"""Which rows a training run trains on, computes its validation loss on, and scores before and after:
a built-in data set's own splits; a separate evaluation file (`--eval-data`); or a seeded tenth (at most 200
rows) held out of a single file. The options that cap each split apply here; `--eval-examples` takes rows spread
evenly over the scored split, not its head.
"""

from __future__ import annotations

from dataclasses import replace
from typing import Any

import torch

from .config import RunConfig, RunError
from .data import BUILTIN_DATASETS, DataSplit, load_data
from .references import choose_references


def spread(rows: list, count: int) -> list:
    """`count` of `rows` evenly spaced from first to last, in order: a subset that represents the whole file
    (data sets are often ordered, and their head is not typical), the same for every run."""
    if count >= len(rows):
        return list(rows)
    return [rows[(i * len(rows)) // count] for i in range(count)]


def load_splits(cfg: RunConfig) -> tuple[DataSplit, DataSplit, DataSplit]:
    """(train, validation for the eval loss, evaluation set scored before/after)."""
    fields: dict[str, Any] = dict(
        input_field=cfg.input_field,
        target_field=cfg.target_field,
        pair_field=cfg.pair_field,
        template=cfg.template,
        columns=cfg.columns,
    )
    name = cfg.data.removesuffix("-full")
    train = load_data(cfg.data, "train", cfg.task, **fields)
    if cfg.eval_data is not None:
        # The evaluation file's labels map to the training data's ids.
        labels = train.label_names or None
        validation = scored = load_data(cfg.eval_data, "validation", cfg.task, label_names=labels, **fields)
    elif name in BUILTIN_DATASETS:
        validation = load_data(cfg.data, "validation", cfg.task, **fields)
        scored_split = "test" if "test" in BUILTIN_DATASETS[name].files else "validation"
        scored = load_data(cfg.data, scored_split, cfg.task, **fields)
    else:
        # A single local file: hold out a seeded tenth (at most 200 rows) for evaluation.
        order = torch.randperm(len(train), generator=torch.Generator().manual_seed(cfg.seed)).tolist()
        held = max(1, min(200, len(train) // 10))
        if len(train) < 2:
            raise RunError(f"{cfg.data}: {len(train)} example(s) is too few to train and evaluate on")
        validation = scored = replace(train, examples=[train.examples[i] for i in order[:held]])
        train = replace(train, examples=[train.examples[i] for i in order[held:]])
    train = choose_references(train, cfg.references)
    if cfg.max_train_examples is not None:
        train = replace(train, examples=train.examples[: cfg.max_train_examples])
    if cfg.eval_examples is not None:
        scored = replace(scored, examples=spread(scored.examples, cfg.eval_examples))
    validation = replace(validation, examples=validation.examples[: cfg.val_examples])
    return train, validation, scored
