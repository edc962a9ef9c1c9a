"""`LoraLayer`: the behaviour shared by every adapted layer type.

A LoRA layer wraps the frozen `base_layer` and holds any number of named adapters. Its output is

    base_layer(x) + Σ_{active, unmerged adapters a}  scaling_a · B_a(A_a(dropout_a(x)))

Subclasses (one per base-layer type) say how A and B are built and how B·A maps onto the base
weight's layout; merging, unmerging, activation and the forward sum live here once.
"""

from __future__ import annotations

import math
from collections.abc import Iterable

import torch
from torch import nn

from ..config import WEIGHT_INITS


class LoraLayer(nn.Module):
    """A frozen base layer plus named low-rank adapters. Construct with `wrap()` from `lorakit.layers`."""

    # State-dict names of the per-adapter containers, as PEFT names them (see lorakit.io).
    adapter_containers: tuple[str, ...] = ("lora_A", "lora_B")
    # Containers only some adapters have (DoRA's `lora_magnitude_vector`); see `containers_for`.
    extra_containers: tuple[str, ...] = ()
    # Which variants the layer type implements (LoraConfig.use_dora, init "pissa" / "olora").
    supports_dora = False
    supports_weight_init = False

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        self.disabled = False  # set by lorakit.disable_adapters: the base layer's output alone

    # -- to be provided by each base-layer type -------------------------------------------------
    @property
    def in_features(self) -> int:
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def adapter_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """Shape of A and B of a rank-r adapter, keyed by container name (A first)."""
        raise NotImplementedError

    def _create_adapter(self, name: str, r: int) -> None:
        """Create this adapter's A and B (untrained) in the containers named by `adapter_containers`."""
        raise NotImplementedError

    def _lora_forward(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """B(A(dropout(x))) without scaling, in the base layer's output layout."""
        raise NotImplementedError

    def delta_weight(self, name: str) -> torch.Tensor:
        """scaling · B·A laid out like `base_layer.weight`."""
        raise NotImplementedError

    # -- adapters -----------------------------------------------------------------------------
    def adapter_tensor(self, container: str, name: str) -> torch.Tensor:
        """The A or B tensor of adapter `name` (a module's weight or a bare parameter)."""
        value = getattr(self, container)[name]
        return value.weight if isinstance(value, nn.Module) else value

    def _lora_a_weight(self, name: str) -> torch.Tensor:
        return self.adapter_tensor(self.adapter_containers[0], name)

    def _lora_b_weight(self, name: str) -> torch.Tensor:
        return self.adapter_tensor(self.adapter_containers[1], name)

    @property
    def adapter_names(self) -> list[str]:
        return list(self.scaling)

    @property
    def weight(self) -> torch.Tensor:
        # Model code sometimes reads `.weight` (dtype checks, tying); it means the base weight.
        return self.base_layer.weight

    @property
    def bias(self) -> torch.Tensor | None:
        return getattr(self.base_layer, "bias", None)

    def __getattr__(self, name: str):
        try:
            return super().__getattr__(name)
        except AttributeError:
            # Model code may read attributes of the layer it built (`c_attn.nf`, `q_proj.in_features`).
            if name.startswith("__") or name == "base_layer":
                raise
            return getattr(super().__getattr__("base_layer"), name)

    def max_rank(self) -> int:
        return min(self.in_features, self.out_features)

    def containers_for(self, name: str) -> tuple[str, ...]:
        """The containers that hold tensors of adapter `name` (A, B, and the DoRA magnitude if it has one)."""
        return self.adapter_containers + tuple(c for c in self.extra_containers if name in getattr(self, c))

    def check_variant(self, init: str, use_dora: bool) -> None:
        """ValueError when this layer type cannot hold an adapter with these options."""
        kind = type(self.base_layer).__name__
        if use_dora and not self.supports_dora:
            raise ValueError(f"DoRA (use_dora) is implemented for Linear and Conv1D layers, not for {kind}")
        if init in WEIGHT_INITS and not self.supports_weight_init:
            raise ValueError(f"init={init!r} is implemented for Linear and Conv1D layers, not for {kind}")
        if (use_dora or init in WEIGHT_INITS) and not self.base_layer.weight.is_floating_point():
            raise ValueError(f"use_dora and init={init!r} need a floating-point base weight, "
                             f"not {self.base_layer.weight.dtype}")

    def add_adapter(
        self, name: str, r: int, scaling: float, dropout: float, init: str, use_dora: bool = False
    ) -> None:
        if name in self.scaling:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if r > self.max_rank():
            raise ValueError(f"r={r} exceeds min(in, out)={self.max_rank()} of this layer")
        self.check_variant(init, use_dora)
        self._create_adapter(name, r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank[name] = r
        self.scaling[name] = scaling
        self.reset_adapter(name, init)
        weight = self.base_layer.weight
        dtype = weight.dtype if weight.is_floating_point() else torch.float32
        for container in self.adapter_containers:
            holder = getattr(self, container)
            if isinstance(holder[name], nn.Module):
                holder[name].to(device=weight.device, dtype=dtype)  # in place for modules
            else:  # a bare Parameter: Tensor.to returns a copy, so the moved copy takes its place
                holder[name] = nn.Parameter(holder[name].detach().to(device=weight.device, dtype=dtype))
        self._finish_adapter(name, init, use_dora)

    def _finish_adapter(self, name: str, init: str, use_dora: bool) -> None:
        """Hook for variants that need the adapter's final A and B (DoRA's magnitude, PiSSA's frozen copy)."""

    def reset_adapter(self, name: str, init: str) -> None:
        """A random (kaiming-uniform as nn.Linear does, or N(0, 1/r²)), B zero: ΔW starts at exactly 0."""
        a, b = self._lora_a_weight(name), self._lora_b_weight(name)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.rank[name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        for container in (*self.containers_for(name), "lora_dropout"):
            del getattr(self, container)[name]
        del self.scaling[name], self.rank[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.scaling]
        for name in self.adapter_names:
            trainable = name in self.active_adapters
            for container in self.containers_for(name):
                getattr(self, container)[name].requires_grad_(trainable)

    # -- merging ------------------------------------------------------------------------------
    def merge(self, names: Iterable[str]) -> None:
        base_weight = self.base_layer.weight
        for name in names:
            if name in self.merged_adapters:
                raise RuntimeError(f"adapter {name!r} is already merged")
            with torch.no_grad():
                base_weight += self.delta_weight(name).to(base_weight.dtype)
            self.merged_adapters.append(name)

    def unmerge(self) -> None:
        base_weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                base_weight -= self.delta_weight(name).to(base_weight.dtype)

    # -- forward ------------------------------------------------------------------------------
    def forward(self, x: torch.Tensor, *args, **kwargs) -> torch.Tensor:
        result = base_out = self.base_layer(x, *args, **kwargs)
        if self.disabled:
            return result
        row_plan = self.__dict__.get("row_adapters")  # set by lorakit.adapter_rows: an adapter per batch row
        if row_plan is not None:
            return row_plan.apply(self, x, base_out)
        for name in self.active_adapters:
            if name in self.merged_adapters:
                continue
            result = result + self._adapter_output(name, x, base_out).to(result.dtype)
        return result

    def _adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """What adapter `name` adds to the base layer's output `base_out`: scaling · B(A(dropout(x)))."""
        return self._lora_forward(name, x) * self.scaling[name]

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank[n]}" for n in self.adapter_names)
        return f"adapters=[{ranks}], active={self.active_adapters}, merged={self.merged_adapters}"
