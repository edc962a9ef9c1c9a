"""Full fine-tuning: every parameter of the model trains (and the method's file holds them all)."""

from __future__ import annotations

from torch import nn

from .base import MethodOptions, MethodState

OPTIONS: tuple[str, ...] = ()


def apply(model: nn.Module, options: MethodOptions, state: MethodState) -> None:
    for param in model.parameters():
        param.requires_grad_(True)
