"""LoRA on transformers' GPT-2 `Conv1D`, a linear layer whose weight is stored (in, out).

The low-rank path is the same as for `nn.Linear`; only the merged update is transposed to the
fan-in/fan-out layout (PEFT's `fan_in_fan_out=True`).
"""

from __future__ import annotations

import torch

from .linear import LoraLinear


class LoraConv1D(LoraLinear):
    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1]

    def delta_weight(self, name: str) -> torch.Tensor:
        return super().delta_weight(name).T
