"""LoRA on `nn.Linear`: A is an (r × in) linear map, B an (out × r) one; ΔW = scaling · B·A.

The low-rank path runs in one of three ways, all computing s·B(A(dropout(x))): the fused autograd function
of `lora_function.py` while gradients are recorded (also under autocast, in autocast's dtype); in a training
step, for layers fed one input (q, k, v), the columns of a down-projection computed once for all of them
(`shared_input.py`, set up by the training loop); and two matmuls with the scaling folded into B in
inference. Without autocast x is cast to the factors' dtype (float32 master factors over a bf16 / fp16 base)
and the output back to the base output's dtype by `LoraLayer.forward`.

Linear layers (and GPT-2's Conv1D, a subclass) also implement the variants that depend on the base weight,
PiSSA / OLoRA initialisation and DoRA (`layers/variants.py`). Their containers live here: the frozen start
factors in `lora_residual`, DoRA's magnitudes in `lora_magnitude_vector` (PEFT's name), and the factors
f = m / ‖W0 + ΔW‖ of merged DoRA adapters, from which W0 is recovered (up to rounding) when no exact copy
was kept (see `LoraLayer.merge`).
"""

from __future__ import annotations

import torch
from torch import nn

from . import variants
from .base import LoraLayer, LoraVariant, add_to_weight_
from .lora_function import autocast_dtype, lora_dropout_product, low_rank_product


class LoraLinear(LoraLayer):
    extra_containers = ("lora_magnitude_vector",)
    supports_dora = True
    supports_weight_init = True

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.lora_A = nn.ModuleDict()
        self.lora_B = nn.ModuleDict()
        self.lora_magnitude_vector = nn.ParameterDict()  # DoRA adapters only
        self.lora_residual = nn.ModuleDict()  # PiSSA / OLoRA adapters only
        self.dora_merged_factor: dict[str, torch.Tensor] = {}  # m / ‖W0 + ΔW‖ of each merged DoRA adapter

    @property
    def in_features(self) -> int:
        return self.base_layer.in_features

    @property
    def out_features(self) -> int:
        return self.base_layer.out_features

    def adapter_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        return {"lora_A": (r, self.in_features), "lora_B": (self.out_features, r)}

    def to_matrix_layout(self, weight: torch.Tensor) -> torch.Tensor:
        return weight

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        return matrix

    def _create_adapter(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def variant_for(self, init: str, use_dora: bool) -> LoraVariant:
        return variants.variant_for(init, use_dora)

    def low_rank_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        group = self.__dict__.get("input_group")  # set by layers.shared_input while training
        if group is not None and (shared := group.low_rank_output(self, name, x)) is not None:
            return shared
        scaling = self.scaling[name]
        dropout = self.lora_dropout[name]
        a, b = self.lora_a_weight(name), self.lora_b_weight(name)
        if autocast_dtype(x) is None:  # under autocast the matmuls choose the dtype (x is saved uncopied)
            x = x.to(a.dtype)
        if torch.is_grad_enabled():
            p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
            owns_input = self.__dict__.get("owns_input", False)  # set by layers.shared_input while training
            return lora_dropout_product(x, a, b, scaling, p, owns_input)
        return low_rank_product(dropout(x), a, b, scaling)  # inference

    # -- merging --------------------------------------------------------------------------------
    def base_weight_unmerged(self) -> torch.Tensor:
        """W0: the base weight without the merged adapters (the weight itself when none is merged): the exact copy
        kept by a reversible merge, else recovered from the merged weight."""
        weight = self.base_layer.weight
        if not self.merged_adapters:
            return weight
        if self.unmerged_state is not None and "weight" in self.unmerged_state:
            return self.unmerged_state["weight"]
        with torch.no_grad():  # a frozen quantity, also when computed in a forward pass
            plain = [self.low_rank_delta(n) for n in self.merged_adapters if n not in self.dora_merged_factor]
            dora = [
                (self.low_rank_delta(n), self.dora_merged_factor[n])
                for n in self.merged_adapters
                if n in self.dora_merged_factor
            ]
            current = self.to_matrix_layout(weight.detach()).to(self.lora_a_weight(self.merged_adapters[0]).dtype)
            return self.to_base_layout(variants.unmerged_weight(current, plain, dora)).to(weight.dtype)

    def merge_into_base(self, names: list[str]) -> None:
        if not any(self.variants[n].needs_base_weight for n in names):
            return super().merge_into_base(names)
        base_weight = self.base_layer.weight
        with torch.no_grad():
            unmerged = self.to_matrix_layout(self.base_weight_unmerged()).clone()  # the weight changes below
            for name in names:
                delta = self.variants[name].merge(self, name, unmerged)
                add_to_weight_(base_weight, self.to_base_layout(delta))
                self.merged_adapters.append(name)

    def subtract_merged(self) -> None:
        if not self.dora_merged_factor:
            return super().subtract_merged()
        with torch.no_grad():
            self.base_layer.weight.copy_(self.base_weight_unmerged())
        self.merged_adapters.clear()
        self.forget_merges()

    def forget_merges(self) -> None:
        self.dora_merged_factor.clear()
