"""LoRA on a quantized linear layer (`lorakit.quant.QuantLinear`): QLoRA.

Training and the unmerged forward are LoraLinear's: the frozen quantized base computes x·Wᵀ from its
codes, the float A and B add (α/r)·B·A·x. Only merging differs, because a quantized weight cannot take
`W += ΔW` in place: merge decodes W, adds the deltas in fp32 and quantizes the sum again; unmerge decodes,
subtracts and quantizes again. Each re-quantization rounds anew, so

- a merged layer is *not* exactly base + ΔW: the difference is recorded on the layer as
  `requantization_error` (`max_abs`, `rel_frobenius` of the re-quantized minus the exact merged weight),
  logged, and gathered by `lorakit.quant.requantization_errors(model)`;
- unmerge after a reversible merge (the default) puts the original codes and scales back bit for bit (the
  copy is small: the quantized tensors); after `merge(..., reversible=False)` it decodes, subtracts and
  quantizes again, leaving W' ≈ W with a second rounding error (also recorded). For an exact merge into a
  float model use `merge_and_unload(model, dtype=torch.float32)`.

If the base was turned back into a float `nn.Linear` (`lorakit.quant.dequantize`), the plain LoRA merge
applies.
"""

from __future__ import annotations

import logging
import warnings

import torch
from torch import nn

from ..quant.linear import QuantLinear
from .linear import LoraLinear

logger = logging.getLogger(__name__)


class LoraQuantLinear(LoraLinear):
    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__(base_layer)
        self.requantization_error: dict[str, float | str] = {}

    def _quantized(self) -> bool:
        return isinstance(self.base_layer, QuantLinear)

    def check_variant(self, init: str, use_dora: bool) -> None:
        # PiSSA / OLoRA only read W0 (decoded) and never write it: fine on a quantized base. DoRA merges by
        # rescaling W0 in place, which a quantized weight cannot take: not supported here.
        if use_dora and self._quantized():
            raise ValueError(
                "DoRA (use_dora) is not supported on a quantized base layer; use plain LoRA, "
                "or quantize without this layer"
            )
        super().check_variant(init, use_dora)

    def _requantize(self, target: torch.Tensor, operation: str) -> None:
        """Store `target` (the exact float result) quantized, and record the error the rounding added."""
        base: QuantLinear = self.base_layer
        base.quantize_(target)
        with torch.no_grad():
            error = base.dequantize(torch.float32) - target
            norm = target.norm().item()
            self.requantization_error = {
                "operation": operation,
                "max_abs": error.abs().max().item(),
                "rel_frobenius": error.norm().item() / norm if norm > 0 else 0.0,
            }
        logger.info(
            "%s onto a %s base re-quantized the weight: max abs error %.3g, relative Frobenius error %.3g",
            operation,
            base.method,
            self.requantization_error["max_abs"],
            self.requantization_error["rel_frobenius"],
        )
        # One warning per process (constant text); the numbers are on each layer and in the log.
        warnings.warn(
            f"{operation} on a quantized base re-quantizes the weight, which adds rounding error; "
            "see lorakit.quant.requantization_errors(model)",
            stacklevel=3,
        )

    def merge_into_base(self, names: list[str]) -> None:
        if not self._quantized():
            return super().merge_into_base(names)
        with torch.no_grad():
            weight = self.base_layer.dequantize(torch.float32)
            for name in names:
                weight += self.delta_weight(name).to(torch.float32)
        self._requantize(weight, "merge")
        self.merged_adapters.extend(names)

    def subtract_merged(self) -> None:
        if not self._quantized():
            return super().subtract_merged()
        with torch.no_grad():
            weight = self.base_layer.dequantize(torch.float32)
            while self.merged_adapters:
                weight -= self.delta_weight(self.merged_adapters.pop()).to(torch.float32)
        self._requantize(weight, "unmerge")

    def forget_merges(self) -> None:
        super().forget_merges()
        self.requantization_error = {}  # the base holds its original codes again
