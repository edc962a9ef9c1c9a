"""LoRA on transformers' GPT-2 `Conv1D`, a linear layer whose weight is stored (in, out).

The low-rank path is the same as for `nn.Linear`; only the weight layout differs (PEFT's
`fan_in_fan_out=True`): updates are transposed into it, and DoRA's per-output norms, PiSSA and OLoRA work on
the transposed weight.
"""

from __future__ import annotations

import torch

from .linear import LoraLinear


class LoraConv1D(LoraLinear):
    fan_in_fan_out = True

    @property
    def in_features(self) -> int:
        return self.base_layer.weight.shape[0]

    @property
    def out_features(self) -> int:
        return self.base_layer.weight.shape[1]

    def to_matrix_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.T

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.T
