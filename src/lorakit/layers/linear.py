"""LoRA on `nn.Linear`: A is an (r × in) linear map, B an (out × r) one; ΔW = scaling · B·A.

Linear layers (and GPT-2's Conv1D, a subclass) also implement the variants that depend on the base weight
(formulas in `layers/variants.py`):

- PiSSA / OLoRA (`init="pissa"` / `"olora"`): A and B start at factors A0, B0 of W0, kept frozen in
  `lora_residual`; the adapter adds s·(B·A − B0·A0), so its update relative to W0 is low-rank and W0 itself is
  never modified (disabling, deleting or switching adapters stays exact).
- DoRA (`use_dora=True`): a trainable magnitude per output feature in `lora_magnitude_vector` (PEFT's name);
  the layer computes m ⊙ (W0 + ΔW) / ‖W0 + ΔW‖ · x. Merging adds exactly that weight minus W0.
"""

from __future__ import annotations

import torch
import torch.nn.functional as F
from torch import nn

from ..config import WEIGHT_INITS
from . import variants
from .base import LoraLayer
from .lora_function import lora_dropout_product


class _FrozenFactors(nn.Module):
    """The initial (A0, B0) of a PiSSA / OLoRA adapter: buffers, so they follow `.to()` but never train and are
    not saved (they are recomputed from W0 when an adapter is loaded)."""

    def __init__(self, a: torch.Tensor, b: torch.Tensor) -> None:
        super().__init__()
        self.register_buffer("A", a, persistent=False)
        self.register_buffer("B", b, persistent=False)


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

    def magnitude_shape(self) -> tuple[int, ...]:
        return (self.out_features,)

    def _out_in(self, weight: torch.Tensor) -> torch.Tensor:
        """A weight-shaped tensor in (out, in) layout, and back: the identity here, a transpose for Conv1D."""
        return weight

    def _create_adapter(self, name: str, r: int) -> None:
        self.lora_A[name] = nn.Linear(self.in_features, r, bias=False)
        self.lora_B[name] = nn.Linear(r, self.out_features, bias=False)

    def reset_adapter(self, name: str, init: str) -> None:
        if init not in WEIGHT_INITS:
            return super().reset_adapter(name, init)
        weight = self._out_in(self.base_layer.weight)
        a, b = variants.weight_init_factors(init, weight, self.rank[name], self.scaling[name])
        with torch.no_grad():
            self.lora_A[name].weight.copy_(a)
            self.lora_B[name].weight.copy_(b)

    def _finish_adapter(self, name: str, init: str, use_dora: bool) -> None:
        if init in WEIGHT_INITS:  # after the move to the base dtype, so that B·A − B0·A0 is exactly 0
            self.lora_residual[name] = _FrozenFactors(
                self._lora_a_weight(name).detach().clone(), self._lora_b_weight(name).detach().clone()
            )
        if use_dora:
            with torch.no_grad():
                weight = self._out_in(self.base_layer.weight).to(self._lora_a_weight(name).dtype)
                magnitude = variants.row_norm(weight, self.low_rank_delta(name))
            self.lora_magnitude_vector[name] = nn.Parameter(magnitude)

    def delete_adapter(self, name: str) -> None:
        super().delete_adapter(name)
        if name in self.lora_residual:
            del self.lora_residual[name]

    # -- the update -----------------------------------------------------------------------------
    def _lora_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        lora_a = self.lora_A[name]
        x = x.to(lora_a.weight.dtype)
        return self.lora_B[name](lora_a(self.lora_dropout[name](x)))

    def low_rank_delta(self, name: str) -> torch.Tensor:
        """s·(B·A − B0·A0) in (out, in) layout: the plain-LoRA update relative to W0 (no B0·A0 term unless the
        adapter was initialised by PiSSA / OLoRA)."""
        product = self._lora_b_weight(name) @ self._lora_a_weight(name)
        if name in self.lora_residual:
            residual = self.lora_residual[name]
            product = product - residual.B @ residual.A
        return product * self.scaling[name]

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """(B', A') with B'·A' = B·A − B0·A0: the adapter as a plain LoRA of W0 (rank 2r for PiSSA/OLoRA)."""
        a, b = self._lora_a_weight(name), self._lora_b_weight(name)
        if name not in self.lora_residual:
            return b, a
        residual = self.lora_residual[name]
        return torch.cat([b, residual.B], dim=1), torch.cat([a, -residual.A], dim=0)

    def delta_weight(self, name: str) -> torch.Tensor:
        """The low-rank update in the base weight's layout (without DoRA's rescaling; see `merged_delta`)."""
        return self._out_in(self.low_rank_delta(name))

    def _adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        scaling = self.scaling[name]
        dropout = self.lora_dropout[name]
        x = x.to(self.lora_A[name].weight.dtype)
        residual = self.lora_residual[name] if name in self.lora_residual else None
        correction = F.linear(F.linear(x, residual.A), residual.B) * scaling if residual is not None else 0
        plain = name not in self.lora_magnitude_vector
        if plain and (x.device.type == "meta" or not torch.is_autocast_enabled(x.device.type)):
            a, b = self._lora_a_weight(name), self._lora_b_weight(name)
            if torch.is_grad_enabled():
                p = dropout.p if isinstance(dropout, nn.Dropout) and self.training else 0.0
                out = lora_dropout_product(x, a, b, scaling, p)
            else:  # inference: the scaling folded into B (out × r), no pass over the output for it
                out = F.linear(F.linear(dropout(x), a), b * scaling)
            return out - correction if residual is not None else out
        dropped = dropout(x)
        out = self.lora_B[name](self.lora_A[name](dropped)) * scaling
        if plain:
            return out - correction
        # DoRA: f ⊙ (W0 + ΔW)·x − W0·x = (f − 1) ⊙ W_res·x + f ⊙ s·B·A·x − s·B0·A0·x,
        # with W_res = W0 − s·B0·A0 and f = m / ‖W0 + ΔW‖ (a constant for the backward pass).
        weight = self._out_in(self.base_weight_unmerged()).to(x.dtype)
        with torch.no_grad():
            norm = variants.row_norm(weight, self.low_rank_delta(name))
        factor = self.lora_magnitude_vector[name] / norm
        if (isinstance(dropout, nn.Identity) or not self.training) and not self.merged_adapters:
            bias = self.base_layer.bias
            base = base_out.to(x.dtype) - (bias.to(x.dtype) if bias is not None else 0)
            base_res = base - correction
        else:  # the base part sees the same (dropped-out) input as B·A, as in PEFT
            base_res = F.linear(dropped, weight)
            if residual is not None:
                base_res = base_res - F.linear(F.linear(dropped, residual.A), residual.B) * scaling
        return (factor - 1) * base_res + factor * out - correction

    # -- merging --------------------------------------------------------------------------------
    def base_weight_unmerged(self) -> torch.Tensor:
        """W0: the base weight without the merged adapters (the weight itself when none is merged)."""
        weight = self.base_layer.weight
        if not self.merged_adapters:
            return weight
        with torch.no_grad():  # a frozen quantity, also when computed in a forward pass
            plain = [self.low_rank_delta(n) for n in self.merged_adapters if n not in self.dora_merged_factor]
            dora = [(self.low_rank_delta(n), self.dora_merged_factor[n]) for n in self.merged_adapters
                    if n in self.dora_merged_factor]
            current = self._out_in(weight.detach()).to(self._lora_a_weight(self.merged_adapters[0]).dtype)
            return self._out_in(variants.unmerged_weight(current, plain, dora)).to(weight.dtype)

    def merge(self, names) -> None:
        names = list(names)
        if not any(n in self.lora_magnitude_vector for n in names):
            return super().merge(names)
        base_weight = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters:
                raise RuntimeError(f"adapter {name!r} is already merged")
        with torch.no_grad():
            unmerged = self._out_in(self.base_weight_unmerged()).clone()  # the weight changes below
            for name in names:
                delta = self.low_rank_delta(name)
                if name in self.lora_magnitude_vector:
                    w0 = unmerged.to(delta.dtype)
                    factor = self.lora_magnitude_vector[name].detach() / variants.row_norm(w0, delta)
                    delta = variants.dora_merged_delta(w0, delta, factor)
                    self.dora_merged_factor[name] = factor
                base_weight += self._out_in(delta).to(base_weight.dtype)
                self.merged_adapters.append(name)

    def unmerge(self) -> None:
        if not self.dora_merged_factor:
            return super().unmerge()
        with torch.no_grad():
            self.base_layer.weight.copy_(self.base_weight_unmerged())
        self.merged_adapters.clear()
        self.dora_merged_factor.clear()

    def merged_delta(self, name: str) -> torch.Tensor:
        """What adapter `name` changes in the function, as a weight update in the base layout (DoRA included):
        the weight it would merge into the unmerged W0."""
        delta = self.low_rank_delta(name)
        if name not in self.lora_magnitude_vector:
            return self._out_in(delta)
        w0 = self._out_in(self.base_weight_unmerged()).to(delta.dtype)
        factor = self.lora_magnitude_vector[name] / variants.row_norm(w0, delta)
        return self._out_in(variants.dora_merged_delta(w0, delta, factor))
