"""LoRA layer types, and the one place that decides which wraps which base layer.

To support a new base-layer type: write a `LoraLayer` subclass in its own file (the abstract members of
`layers/base.py`: sizes, adapter shapes, creation, the low-rank output, the two layout conversions) and add
one line to `_LAYER_TYPES`. Order matters only for subclasses: the first `isinstance` match wins. A new
variant is a `LoraVariant` subclass in `layers/variants.py`, chosen by `variant_for`.
"""

from __future__ import annotations

from torch import nn
from transformers.pytorch_utils import Conv1D

from .base import LoraLayer, LoraVariant, adapter_dtype
from .conv1d import LoraConv1D
from .conv2d import LoraConv2d
from .embedding import LoraEmbedding
from .linear import LoraLinear
from .quant_linear import LoraQuantLinear, QuantLinear

_LAYER_TYPES: list[tuple[type[nn.Module], type[LoraLayer]]] = [
    (QuantLinear, LoraQuantLinear),  # lorakit.quant: a quantized frozen base (QLoRA)
    (nn.Linear, LoraLinear),
    (Conv1D, LoraConv1D),
    (nn.Embedding, LoraEmbedding),
    (nn.Conv2d, LoraConv2d),
]


def lora_class_for(module: nn.Module) -> type[LoraLayer] | None:
    """The LoRA class that adapts `module`, or None when its type is not supported."""
    for base_type, lora_type in _LAYER_TYPES:
        if isinstance(module, base_type):
            return lora_type
    return None


def is_linear_layer(module: nn.Module) -> bool:
    """Whether `module` is a linear map in the "all-linear" sense: nn.Linear, GPT-2's Conv1D, a QuantLinear,
    or a LoRA layer wrapping one of them."""
    return isinstance(module, (nn.Linear, Conv1D, QuantLinear, LoraLinear))


def supported_types() -> list[str]:
    return [base_type.__name__ for base_type, _ in _LAYER_TYPES]


__all__ = [
    "LoraConv1D",
    "LoraConv2d",
    "LoraEmbedding",
    "LoraLayer",
    "LoraLinear",
    "LoraQuantLinear",
    "LoraVariant",
    "adapter_dtype",
    "is_linear_layer",
    "lora_class_for",
    "supported_types",
]
