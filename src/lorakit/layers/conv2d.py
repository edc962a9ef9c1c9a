"""LoRA on `nn.Conv2d`: A is a conv with the base kernel, stride and padding into r channels, B a 1×1
conv from r channels to the output channels; their composition is again a conv with the base kernel."""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from .base import LoraLayer


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
            base.in_channels, r, base.kernel_size, base.stride, base.padding, base.dilation,
            bias=False, padding_mode=base.padding_mode,
        )
        self.lora_B[name] = nn.Conv2d(r, base.out_channels, 1, bias=False)

    def _lora_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        return self.lora_B[name](lora_a(self.lora_dropout[name](x.to(lora_a.weight.dtype))))

    def delta_weight(self, name: str) -> torch.Tensor:
        a = self._lora_a_weight(name)  # (r, in, kh, kw)
        b = self._lora_b_weight(name)  # (out, r, 1, 1)
        # Composing a conv with a following 1×1 conv mixes A's output channels by B: a channel contraction.
        return torch.einsum("or,rikl->oikl", b[:, :, 0, 0], a) * self.scaling[name]
