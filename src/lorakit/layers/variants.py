"""The LoRA variants that depend on the base weight, PiSSA / OLoRA initialisation and DoRA: their strategy
objects (`WeightInitVariant`, `DoraVariant`, chosen by `variant_for`) and their arithmetic.

Every function works on matrices in the (out, in) layout of `nn.Linear.weight`; the layer classes transpose
GPT-2's (in, out) `Conv1D` weights before calling them.

PiSSA (Meng et al. 2024): W0 = U S Vᵀ; the adapter starts at the principal part,
    B0 = U_r · diag(√(S_r / s)),  A0 = diag(√(S_r / s)) · V_rᵀ,  so that  s·B0·A0 = U_r S_r V_rᵀ.
OLoRA (Büyükakyüz 2024): W0 = Q R;  B0 = Q[:, :r],  A0 = R[:r].
In both the frozen part is the residual W0 − s·B0·A0, so the model starts exactly as the base. lorakit never
writes the residual into the base weight: it keeps W0 and subtracts s·B0·A0·x as a frozen low-rank term,
which is the same function (the adapter's update relative to W0 is s·(B·A − B0·A0)).

DoRA (Liu et al. 2024): W' = m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖, the norm of each output feature's row (PEFT's
`torch.linalg.norm(weight, dim=1)` on the (out, in) matrix; the paper's "column-wise" for its (in, out)
convention). The norm is treated as a constant in the backward pass, as the paper suggests (section 4.3).
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import WEIGHT_INITS
from .base import PLAIN, LoraLayer, LoraVariant
from .lora_function import autocast_dtype, low_rank_product


def pissa_factors(weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) from the top-r singular triplets of `weight` (out, in), computed in float32."""
    u, s, vh = torch.linalg.svd(weight.detach().to(torch.float32), full_matrices=False)
    root = torch.sqrt(s[:r] / scaling)
    return root[:, None] * vh[:r], u[:, :r] * root[None, :]


def olora_factors(weight: torch.Tensor, r: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(A0, B0) = (R[:r], Q[:, :r]) of the reduced QR decomposition of `weight` (out, in), in float32."""
    q, rr = torch.linalg.qr(weight.detach().to(torch.float32))
    return rr[:r].contiguous(), q[:, :r].contiguous()


def weight_init_factors(init: str, weight: torch.Tensor, r: int, scaling: float) -> tuple[torch.Tensor, torch.Tensor]:
    if init == "pissa":
        return pissa_factors(weight, r, scaling)
    if init == "olora":
        return olora_factors(weight, r)
    raise ValueError(f"{init!r} is not an initialisation computed from the base weight")


def row_norm(weight: torch.Tensor, delta: torch.Tensor) -> torch.Tensor:
    """‖W + ΔW‖ of every row (output feature) of the (out, in) matrices: DoRA's denominator."""
    return torch.linalg.norm(weight + delta, dim=1)


def dora_merged_delta(weight: torch.Tensor, delta: torch.Tensor, factor: torch.Tensor) -> torch.Tensor:
    """What merging a DoRA adapter adds to the unmerged weight W0: f ⊙ (W0 + ΔW) − W0 with f = m / ‖W0 + ΔW‖."""
    return (factor - 1)[:, None] * weight + factor[:, None] * delta


def unmerged_weight(
    weight: torch.Tensor, plain_deltas: list[torch.Tensor], dora_terms: list[tuple[torch.Tensor, torch.Tensor]]
) -> torch.Tensor:
    """W0 recovered from a weight that holds merged adapters.

    W = W0 + Σ_plain ΔW_j + Σ_dora [(f_k − 1) ⊙ W0 + f_k ⊙ ΔW_k], so row by row
    W0 = (W − Σ ΔW_j − Σ f_k ⊙ ΔW_k) / (1 + Σ (f_k − 1)). `dora_terms` holds (ΔW_k, f_k) of each merged DoRA
    adapter, f_k being the factor used when it was merged.
    """
    numerator = weight.clone()
    denominator = torch.ones(weight.shape[0], dtype=weight.dtype, device=weight.device)
    for delta in plain_deltas:
        numerator -= delta
    for delta, factor in dora_terms:
        numerator -= factor[:, None] * delta
        denominator += factor - 1
    return numerator / denominator[:, None]


# -- the strategies ---------------------------------------------------------------------------------
class FrozenFactors(nn.Module):
    """The initial (A0, B0) of a PiSSA / OLoRA adapter: buffers, so they follow `.to()` but never train and are
    not saved (they are recomputed from W0 when an adapter is loaded)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


class WeightInitVariant(LoraVariant):
    """PiSSA / OLoRA: A and B start at factors A0, B0 of W0, kept frozen in the layer's `lora_residual`; the
    adapter adds s·(B·A − B0·A0)·x, so W0 itself is never modified. Linear layers only."""

    def __init__(self, init: str) -> None:
        self.init = init

    def initialise(self, layer: LoraLayer, name: str, init: str) -> None:
        weight = layer.to_matrix_layout(layer.base_layer.weight)
        a, b = weight_init_factors(self.init, weight, layer.rank[name], layer.scaling[name])
        with torch.no_grad():
            layer.lora_a_weight(name).copy_(a)
            layer.lora_b_weight(name).copy_(b)

    def finish(self, layer: LoraLayer, name: str) -> None:
        # After the move to the base dtype, so that B·A − B0·A0 is exactly 0.
        a, b = layer.lora_a_weight(name), layer.lora_b_weight(name)
        layer.lora_residual[name] = FrozenFactors(a.detach().clone(), b.detach().clone())

    def remove(self, layer: LoraLayer, name: str) -> None:
        del layer.lora_residual[name]

    def factors(self, layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        a, b = layer.lora_a_weight(name), layer.lora_b_weight(name)
        residual = layer.lora_residual[name]
        return torch.cat([b, residual.B], dim=1), torch.cat([a, -residual.A], dim=0)

    def product(self, layer: LoraLayer, name: str) -> torch.Tensor:
        residual = layer.lora_residual[name]
        return layer.lora_b_weight(name) @ layer.lora_a_weight(name) - residual.B @ residual.A

    def correction(self, layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor:
        """s·B0·A0·x: the frozen start, which the adapter's output leaves out."""
        residual = layer.lora_residual[name]
        return low_rank_product(x, residual.A, residual.B, layer.scaling[name])

    def output(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        if autocast_dtype(x) is None:  # under autocast the matmuls choose the dtype
            x = x.to(layer.lora_a_weight(name).dtype)
        correction = self.correction(layer, name, x)
        return layer.low_rank_output(name, x) - correction


class DoraVariant(LoraVariant):
    """DoRA over a plain or PiSSA / OLoRA adapter (`inner`): a trainable magnitude m per output feature in the
    layer's `lora_magnitude_vector`; the layer computes m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ · x. Linear layers only."""

    needs_base_weight = True

    def __init__(self, inner: LoraVariant) -> None:
        self.inner = inner

    def initialise(self, layer: LoraLayer, name: str, init: str) -> None:
        self.inner.initialise(layer, name, init)

    def finish(self, layer: LoraLayer, name: str) -> None:
        self.inner.finish(layer, name)
        with torch.no_grad():
            weight = layer.to_matrix_layout(layer.base_layer.weight).to(layer.lora_a_weight(name).dtype)
            magnitude = row_norm(weight, layer.low_rank_delta(name))
        layer.lora_magnitude_vector[name] = nn.Parameter(magnitude)

    def remove(self, layer: LoraLayer, name: str) -> None:
        self.inner.remove(layer, name)

    def factors(self, layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        return self.inner.factors(layer, name)

    def product(self, layer: LoraLayer, name: str) -> torch.Tensor:
        return self.inner.product(layer, name)

    def correction(self, layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor | None:
        return self.inner.correction(layer, name, x)

    def output(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        # f ⊙ (W0 + ΔW)·x − W0·x = (f − 1) ⊙ W_res·x + f ⊙ s·B·A·x − s·B0·A0·x,
        # with W_res = W0 − s·B0·A0 and f = m / ‖W0 + ΔW‖ (a constant for the backward pass).
        scaling, dropout = layer.scaling[name], layer.lora_dropout[name]
        x = x.to(layer.lora_a_weight(name).dtype)
        correction = self.correction(layer, name, x)
        dropped = dropout(x)
        out = layer.lora_B[name](layer.lora_A[name](dropped)) * scaling
        weight = layer.to_matrix_layout(layer.base_weight_unmerged()).to(x.dtype)
        with torch.no_grad():
            norm = row_norm(weight, layer.low_rank_delta(name))
        factor = layer.lora_magnitude_vector[name] / norm
        if (isinstance(dropout, nn.Identity) or not layer.training) and not layer.merged_adapters:
            bias = layer.base_layer.bias
            base_res = base_out.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
            base_correction = correction
        else:  # the base part sees the same (dropped-out) input as B·A, as in PEFT
            base_res = F.linear(dropped, weight)
            base_correction = self.correction(layer, name, dropped)
        if base_correction is not None:
            base_res = base_res - base_correction
        result = (factor - 1) * base_res + factor * out
        return result if correction is None else result - correction

    def delta(self, layer: LoraLayer, name: str, base_matrix: torch.Tensor | None = None) -> torch.Tensor:
        return self._merge_terms(layer, name, base_matrix)[0]

    def merge(self, layer: LoraLayer, name: str, base_matrix: torch.Tensor) -> torch.Tensor:
        delta, factor = self._merge_terms(layer, name, base_matrix)
        layer.dora_merged_factor[name] = factor  # what unmerging needs to recover W0 exactly
        return delta

    def _merge_terms(
        self, layer: LoraLayer, name: str, base_matrix: torch.Tensor | None
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """(f ⊙ (W0 + ΔW) − W0, f) with f = m / ‖W0 + ΔW‖."""
        delta = layer.low_rank_delta(name)
        if base_matrix is None:
            base_matrix = layer.to_matrix_layout(layer.base_weight_unmerged())
        w0 = base_matrix.to(delta.dtype)
        factor = layer.lora_magnitude_vector[name] / row_norm(w0, delta)
        return dora_merged_delta(w0, delta, factor), factor


def variant_for(init: str, use_dora: bool) -> LoraVariant:
    """The strategy of a new adapter on a linear layer: plain, PiSSA / OLoRA, and DoRA over either."""
    inner = WeightInitVariant(init) if init in WEIGHT_INITS else PLAIN
    return DoraVariant(inner) if use_dora else inner
