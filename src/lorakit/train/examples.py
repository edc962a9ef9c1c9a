"""What a data set is to lorakit: the two tasks, the example types of each (`Example` for generation,
`ClassExample` for classification), a split of them (`DataSplit`), the label value the loss skips, and
the error a data set that cannot be used raises. `lorakit.train.data` re-exports all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple

GENERATION, CLASSIFICATION = "causal-lm", "seq-cls"
IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips


class DataError(ValueError):
    """A data set that cannot be read or used; the message is one line, fit to show a user."""


@dataclass(frozen=True)
class Example:
    """A generation example; references holds every reference text of the same input (the target among them)."""

    prompt: str
    target: str
    references: list[str]


class ClassExample(NamedTuple):
    """A classification example: a text, an optional second text, and a label id."""

    text: str
    text_pair: str | None
    label: int


@dataclass(frozen=True)
class DataSplit:
    """One split of a data set, with its task and, for classification, the label names (index = label id)."""

    task: str
    examples: list[Example] | list[ClassExample]
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return len(self.label_names)

    def __len__(self) -> int:
        return len(self.examples)
