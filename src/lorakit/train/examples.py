"""What a data set is to lorakit: the tasks, the example types of each (`Example` for generation, whose
prompt is a text or a conversation; `ClassExample` for classification and regression), a split of them
(`DataSplit`), the label value the loss skips, and the error a data set that cannot be used raises.
`lorakit.train.data` re-exports all of them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import NamedTuple, TypeAlias

GENERATION, CLASSIFICATION = "causal-lm", "seq-cls"
REGRESSION = "regression"  # one float output per example, MSE loss (a seq-cls model with num_labels=1)
TASKS = (GENERATION, CLASSIFICATION, REGRESSION)
IGNORE_INDEX = -100  # label value that PyTorch's cross-entropy skips

# A chat conversation: turns {"role": "system" | "user" | "assistant", "content": text}, in order.
Conversation: TypeAlias = tuple[dict[str, str], ...]
# What a generation example asks: a text (formatted as one user turn), or a conversation that ends
# before the assistant turn to be generated.
Prompt: TypeAlias = str | Conversation


class DataError(ValueError):
    """A data set that cannot be read or used; the message is one line, fit to show a user."""


@dataclass(frozen=True)
class Example:
    """A generation example; references holds every reference text of the same input (the target among them)."""

    prompt: Prompt
    target: str
    references: list[str]


class ClassExample(NamedTuple):
    """A classification example: a text, an optional second text, and a label id (regression: the target value)."""

    text: str
    text_pair: str | None
    label: int | float


@dataclass(frozen=True)
class DataSplit:
    """One split of a data set, with its task and, for classification, the label names (index = label id).
    num_labels is the model's output count: the label names' for classification, 1 for regression."""

    task: str
    examples: list[Example] | list[ClassExample]
    label_names: tuple[str, ...] = ()

    @property
    def num_labels(self) -> int:
        return 1 if self.task == REGRESSION else len(self.label_names)

    def __len__(self) -> int:
        return len(self.examples)
