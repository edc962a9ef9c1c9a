"""LoRA on `nn.Conv2d`: A is a conv with the base kernel, stride and padding into r channels, B a 1×1
conv from r channels to the output channels; their composition is again a conv with the base kernel, whose
(out × in·kh·kw) matrix is B·A with B and A flattened (`lora_factors`)."""

from __future__ import annotations

import torch
from torch import nn

from .base import LoraLayer
from .lora_function import autocast_dtype


class LoraConv2d(LoraLayer):
    def __init__(self, base_layer: nn.Conv2d) -> None:
        if base_layer.groups != 1:
            raise ValueError(f"LoRA on grouped convolutions (groups={base_layer.groups}) is not supported")
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()

    @property
    def in_features(self) -> int:
        kh, kw = self.base_layer.kernel_size
        return self.base_layer.in_channels * kh * kw

    @property
    def out_features(self) -> int:
        return self.base_layer.out_channels

    def adapter_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        base = self.base_layer
        return {"lora_A": (r, base.in_channels, *base.kernel_size), "lora_B": (base.out_channels, r, 1, 1)}

    def _create_adapter(self, name: str, r: int) -> None:
        base = self.base_layer
        self.lora_A[name] = nn.Conv2d(
            base.in_channels,
            r,
            base.kernel_size,
            base.stride,
            base.padding,
            base.dilation,
            bias=False,
            padding_mode=base.padding_mode,
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, bias=False)

    def to_matrix_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight.flatten(1)  # (out, in, kh, kw) -> (out, in·kh·kw)

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix.reshape(self.base_layer.weight.shape)

    def low_rank_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        if autocast_dtype(x) is None:  # under autocast the convolutions choose the dtype
            x = x.to(self.lora_a_weight(name).dtype)
        return self.lora_B[name](self.lora_A[name](self.lora_dropout[name](x))) * self.scaling[name]
