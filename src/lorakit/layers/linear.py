"""LoRA on `nn.Linear`: A is an (r × in) linear map, B an (out × r) one; ΔW = scaling · B·A."""

from __future__ import annotations

import torch
from torch import nn

from .base import LoraLayer


class LoraLinear(LoraLayer):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, self.in_features), "lora_B": (self.out_features, r)}

    def _create_adapter(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def _lora_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        x = x.to(lora_a.weight.dtype)
        return self.lora_B[name](lora_a(self.lora_dropout[name](x)))

    def delta_weight(self, name: str) -> torch.Tensor:
        return (self._lora_b_weight(name) @ self._lora_a_weight(name)) * self.scaling[name]
