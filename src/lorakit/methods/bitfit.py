"""BitFit (Ben Zaken et al. 2022): only the bias terms train, every one of them (attention, MLP and
layer-norm biases); models without biases (Llama-family) are refused."""

from __future__ import annotations

from torch import nn

from ..targets import head_names
from .base import MethodOptions, MethodState

OPTIONS: tuple[str, ...] = ()


def apply(model: nn.Module, options: MethodOptions, state: MethodState) -> None:
    heads = tuple(f"{h}." for h in head_names(model))
    biases = [p for n, p in model.named_parameters() if n.endswith("bias") and not n.startswith(heads)]
    if not biases:
        raise ValueError(f"{type(model).__name__} has no bias parameters outside its head: BitFit would train nothing")
    for param in biases:
        param.requires_grad_(True)
