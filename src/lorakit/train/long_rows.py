"""Rows longer than max_length, and max_length itself when the run leaves it to the data ("auto").

A few long rows never stop a run: each is cut to max_length (`truncate`, the default: see
`encoding.fit` for generation; classification inputs lose their end) or left out (`drop`), and the run
reports how many. Only a split left with no row at all is an error.

Auto max_length is the longest encoded row of the training and validation rows, at most the model's
context and AUTO_MAX_LENGTH (1024): every row fits unless one is longer than that. Batches are padded to
their own longest row, so a long max_length costs memory only in the batches that hold long rows.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

from transformers import PreTrainedTokenizerBase

from .encoding import encode_causal, encode_classification
from .examples import ClassExample, DataError, DataSplit, Example

LONG_ROW_POLICIES = ("truncate", "drop")
AUTO_MAX_LENGTH = 1024


@dataclass
class SplitRows:
    """What happened to one split's rows: how many there were, and how many were cut or left out."""

    rows: int
    truncated: int = 0
    dropped: int = 0


def encode_whole(split: DataSplit, tokenizer: PreTrainedTokenizerBase) -> list[dict[str, Any]]:
    """Every example of the split encoded without any limit."""
    return [
        encode_classification(tokenizer, example)
        if isinstance(example, ClassExample)
        else encode_causal(tokenizer, example)
        for example in split.examples
    ]


def model_context(model: Any, tokenizer: PreTrainedTokenizerBase) -> int | None:
    """The longest input the model takes: its position table's size (and the tokenizer's stated limit when
    smaller), None when neither says."""
    config = getattr(model, "config", None)
    limits = [getattr(config, key, None) for key in ("max_position_embeddings", "n_positions")]
    stated = getattr(tokenizer, "model_max_length", None)
    limits.append(stated if isinstance(stated, int) and stated < 10**6 else None)  # "no limit" is written as 1e30
    known = [limit for limit in limits if isinstance(limit, int) and limit > 0]
    return min(known) if known else None


def auto_max_length(lengths: Sequence[int], context: int | None) -> int:
    """The longest row, at most the model's context and AUTO_MAX_LENGTH."""
    return min(max(lengths, default=1), context or AUTO_MAX_LENGTH, AUTO_MAX_LENGTH)


def limit_rows(
    split: DataSplit,
    encoded: list[dict[str, Any]],
    tokenizer: PreTrainedTokenizerBase,
    max_length: int,
    policy: str,
    name: str = "training",
) -> tuple[DataSplit, list[dict[str, Any]], SplitRows]:
    """The split and its encoded rows (from `encode_whole`) with every row over max_length cut or left out
    by policy, and the count of each; a split that had rows and has none left is a DataError."""
    if policy not in LONG_ROW_POLICIES:
        raise DataError(f"long_rows must be one of {', '.join(LONG_ROW_POLICIES)}, not {policy!r}")
    if max_length < 2:
        raise DataError(f"max_length must be at least 2 (a prompt token and a target token), not {max_length}")
    examples: list[Any] = []
    rows: list[dict[str, Any]] = []
    report = SplitRows(len(encoded))
    all_examples: list[Example | ClassExample] = list(split.examples)
    for example, row in zip(all_examples, encoded):
        if len(row["input_ids"]) <= max_length:
            examples.append(example)
            rows.append(row)
        elif policy == "truncate":
            report.truncated += 1
            examples.append(example)
            rows.append(
                encode_classification(tokenizer, example, max_length)
                if isinstance(example, ClassExample)
                else encode_causal(tokenizer, example, max_length)
            )
        else:
            report.dropped += 1
    if encoded and not rows:
        shortest = min(len(row["input_ids"]) for row in encoded)
        raise DataError(
            f"every {name} row is longer than max_length {max_length} (the shortest has {shortest} tokens); "
            "raise --max-length or use --long-rows truncate"
        )
    return DataSplit(split.task, examples, split.label_names), rows, report


def describe(report: SplitRows, name: str, max_length: int) -> str | None:
    """The log line about a split's long rows, None when it had none."""
    if not (report.truncated or report.dropped):
        return None
    done = f"{report.truncated} truncated" if report.truncated else f"{report.dropped} left out"
    return f"long rows: {done} of {report.rows} {name} rows (longer than {max_length} tokens)"
