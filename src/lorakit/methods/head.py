"""Linear probing: only the classification head (`classifier` / `score`) trains, on the frozen model."""

from __future__ import annotations

from torch import nn

from ..targets import head_names
from .base import MethodOptions, MethodState

OPTIONS: tuple[str, ...] = ()


def apply(model: nn.Module, options: MethodOptions, state: MethodState) -> None:
    if not head_names(model):
        raise ValueError(
            f"linear probing trains a classification head, and {type(model).__name__} has none "
            "(classifier / score): use a sequence-classification model"
        )
