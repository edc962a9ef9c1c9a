"""`LoraLayer`: the interface every adapted layer type implements, and the behaviour they share; `LoraVariant`:
the strategy interface of an adapter's variant, implemented here by plain LoRA.

A LoRA layer wraps the frozen `base_layer` and holds any number of named adapters. Its output is

    base_layer(x) + Σ_{active, unmerged adapters a}  adapter_output(a, x, base_layer(x))

which for a plain adapter is scaling_a · B_a(A_a(dropout_a(x))). Subclasses (one per base-layer type) say how
A and B are built, how B·A maps onto the base weight's layout and how the low-rank path runs; each adapter's
variant (chosen once, when the adapter is added) says how A and B start, what the adapter adds to the output
and what merging adds to the weight. Merging, unmerging, activation and the forward sum live here once.

Merging: `merge(names)` adds each adapter's update to the base weight, rounded once to the weight's dtype.
A reversible merge (the default) first keeps an exact copy of the base layer's tensors (`unmerged_state`,
taken at the layer's first merge), and `unmerge` puts those bits back: W0 is restored bit for bit, whatever
the layer type or dtype, quantized bases included (one extra copy of the base tensors while merged). After
`merge(names, reversible=False)` no copy exists and `unmerge` subtracts the updates again (`subtract_merged`),
exact only up to float rounding. `lorakit.merging` states the model-level guarantees.

Layouts: a *matrix* is (out × in), the layout of `nn.Linear.weight` (in = in_channels·kh·kw for Conv2d, the
vocabulary size for Embedding); the *base layout* is the shape and orientation of `base_layer.weight`.
"""

from __future__ import annotations

import math
from collections.abc import Iterable
from typing import Any

import torch
from torch import nn

from ..config import WEIGHT_INITS

HALF_DTYPES = (torch.bfloat16, torch.float16)


def adapter_dtype(base_dtype: torch.dtype, autocast_adapter_dtype: bool = True) -> torch.dtype:
    """The dtype of an adapter's trainable tensors over a base weight of `base_dtype`: float32 master weights
    over a half-precision base (with `autocast_adapter_dtype`, PEFT's default) or a non-float (quantized) one,
    else the base dtype."""
    if not base_dtype.is_floating_point or (autocast_adapter_dtype and base_dtype in HALF_DTYPES):
        return torch.float32
    return base_dtype


def add_to_weight_(weight: torch.Tensor, delta: torch.Tensor) -> None:
    """`weight += delta` in place, rounded once: a float32 ΔW meets a half-precision weight in float32, and the
    sum is cast to the weight's dtype (bf16(W0 + ΔW), not W0 + bf16(ΔW))."""
    if delta.dtype == weight.dtype:
        weight += delta
    else:
        weight.copy_((weight.to(delta.dtype) + delta).to(weight.dtype))


class LoraVariant:
    """Plain LoRA (also with rsLoRA's scaling or a gaussian A): ΔW = s·B·A, A random, B zero.

    The strategy interface of a variant: a layer keeps one instance per adapter (`LoraLayer.variants`) and
    asks it everything that depends on the variant. Subclasses (`layers/variants.py`) override what differs.
    """

    # Whether what merging adds depends on the unmerged base weight W0 (DoRA), not only on A and B.
    needs_base_weight = False

    def initialise(self, layer: LoraLayer, name: str, init: str) -> None:
        """Give the freshly created A and B their starting values (before they move to the base dtype)."""
        layer.reset_adapter(name, init)

    def finish(self, layer: LoraLayer, name: str) -> None:
        """Create what the variant keeps beside A and B, once A and B have their final dtype and device."""

    def remove(self, layer: LoraLayer, name: str) -> None:
        """Drop what `finish` created (A, B and the containers in `extra_containers` go with the adapter)."""

    def factors(self, layer: LoraLayer, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: (B (out × r'), A (r' × in)) with scaling·B·A = `layer.low_rank_delta(name)`."""
        return layer.lora_b_weight(name).flatten(1), layer.lora_a_weight(name).flatten(1)

    def product(self, layer: LoraLayer, name: str) -> torch.Tensor:
        """Semantics: the unscaled update B·A relative to W0, an (out × in) matrix."""
        b, a = self.factors(layer, name)
        return b @ a

    def correction(self, layer: LoraLayer, name: str, x: torch.Tensor) -> torch.Tensor | None:
        """Semantics: the frozen term the output subtracts from s·B·A·x (PiSSA / OLoRA's s·B0·A0·x), or None."""
        return None

    def output(self, layer: LoraLayer, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Semantics: what the adapter adds to `base_out` (= base_layer(x)), shaped like `base_out`."""
        return layer.low_rank_output(name, x)

    def delta(self, layer: LoraLayer, name: str, base_matrix: torch.Tensor | None = None) -> torch.Tensor:
        """Semantics: what merging adds to the unmerged weight W0 (`base_matrix`, read from the layer when
        None), an (out × in) matrix."""
        return layer.low_rank_delta(name)

    def merge(self, layer: LoraLayer, name: str, base_matrix: torch.Tensor) -> torch.Tensor:
        """`delta`, for a merge: a variant that needs to remember something to unmerge records it here."""
        return self.delta(layer, name, base_matrix)


PLAIN = LoraVariant()  # stateless: one instance serves every plain adapter


class LoraLayer(nn.Module):
    """A frozen base layer plus named low-rank adapters. `lorakit.add_adapter` wraps a model's layers in the
    class `lorakit.layers.lora_class_for(module)` names; a layer can also be built directly, `LoraLinear(base)`.
    """

    # State-dict names of the per-adapter containers, as PEFT names them (see lorakit.io).
    adapter_containers: tuple[str, ...] = ("lora_A", "lora_B")
    # Containers only some adapters have (DoRA's `lora_magnitude_vector`); see `containers_for`.
    extra_containers: tuple[str, ...] = ()
    # Which variants the layer type implements (LoraConfig.use_dora, init "pissa" / "olora").
    supports_dora = False
    supports_weight_init = False
    # True when the base weight is stored (in, out) rather than (out, in) (GPT-2's Conv1D; PEFT's name).
    fan_in_fan_out = False

    # Typed loosely on purpose: each subclass reads the attributes of its own base type (in_features, kernel_size,
    # padding_idx, ...), which nn.Module's attribute typing would report as Tensor | Module.
    base_layer: Any

    def __init__(self, base_layer: nn.Module) -> None:
        super().__init__()
        self.base_layer = base_layer
        self.lora_dropout = nn.ModuleDict()
        self.scaling: dict[str, float] = {}
        self.rank: dict[str, int] = {}
        self.variants: dict[str, LoraVariant] = {}
        self.active_adapters: list[str] = []
        self.merged_adapters: list[str] = []
        # The base layer's tensors as they were before the first reversible merge, restored by `unmerge`.
        self.unmerged_state: dict[str, torch.Tensor] | None = None
        self.disabled = False  # set by lorakit.disable_adapters: the base layer's output alone

    # -- to be provided by each base-layer type -------------------------------------------------
    @property
    def in_features(self) -> int:
        """The input size of the (out × in) matrix view of the base weight."""
        raise NotImplementedError

    @property
    def out_features(self) -> int:
        raise NotImplementedError

    def adapter_shapes(self, r: int) -> dict[str, tuple[int, ...]]:
        """Semantics: the shapes of A and B of a rank-r adapter as stored, keyed by container name (A first)."""
        raise NotImplementedError

    def _create_adapter(self, name: str, r: int) -> None:
        """Create this adapter's A and B (untrained) in the containers named by `adapter_containers`."""
        raise NotImplementedError

    def low_rank_output(self, name: str, x: torch.Tensor) -> torch.Tensor:
        """Semantics: scaling · B(A(dropout(x))), shaped like the base layer's output (plain LoRA's output)."""
        raise NotImplementedError

    def to_matrix_layout(self, weight: torch.Tensor) -> torch.Tensor:
        """Semantics: a tensor in the base weight's layout as the (out × in) matrix."""
        raise NotImplementedError

    def to_base_layout(self, matrix: torch.Tensor) -> torch.Tensor:
        """Semantics: an (out × in) matrix in the base weight's layout; the inverse of `to_matrix_layout`."""
        raise NotImplementedError

    # -- an adapter's tensors and update ----------------------------------------------------------
    def adapter_tensor(self, container: str, name: str) -> torch.Tensor:
        """The tensor adapter `name` keeps in `container` (a module's weight or a bare parameter), as stored."""
        value = getattr(self, container)[name]
        if isinstance(value, nn.Module):
            value = value.weight
        return value

    def lora_a_weight(self, name: str) -> torch.Tensor:
        """Semantics: A as stored, shape `adapter_shapes(r)[adapter_containers[0]]` (the live parameter)."""
        return self.adapter_tensor(self.adapter_containers[0], name)

    def lora_b_weight(self, name: str) -> torch.Tensor:
        """Semantics: B as stored, shape `adapter_shapes(r)[adapter_containers[1]]` (the live parameter)."""
        return self.adapter_tensor(self.adapter_containers[1], name)

    def lora_factors(self, name: str) -> tuple[torch.Tensor, torch.Tensor]:
        """Semantics: (B (out × r'), A (r' × in)) as matrices with scaling·B·A = `low_rank_delta(name)`: the
        adapter as a plain LoRA of W0 (r' = 2r for PiSSA / OLoRA, whose frozen start is folded in)."""
        return self.variants[name].factors(self, name)

    def low_rank_delta(self, name: str) -> torch.Tensor:
        """Semantics: scaling · B·A relative to W0, an (out × in) matrix (without DoRA's rescaling)."""
        return self.variants[name].product(self, name) * self.scaling[name]

    def delta_weight(self, name: str) -> torch.Tensor:
        """Semantics: what adapter `name` changes in the layer's function, as an update of the unmerged base
        weight, in the base weight's layout: the low-rank update, or DoRA's m ⊙ (W0 + ΔW)/‖W0 + ΔW‖ − W0."""
        return self.to_base_layout(self.variants[name].delta(self, name))

    def magnitude_shape(self) -> tuple[int, ...]:
        """Semantics: the shape of DoRA's magnitude vector, one entry per output feature (`supports_dora`)."""
        return (self.out_features,)

    def adapter_output(self, name: str, x: torch.Tensor, base_out: torch.Tensor) -> torch.Tensor:
        """Semantics: what adapter `name` adds to the base layer's output `base_out` (= base_layer(x)) for input
        `x`, shaped like `base_out` (in the adapter's dtype)."""
        return self.variants[name].output(self, name, x, base_out)

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

    # -- adapters -----------------------------------------------------------------------------
    def check_variant(self, init: str, use_dora: bool) -> None:
        """ValueError when this layer type cannot hold an adapter with these options."""
        kind = type(self.base_layer).__name__
        if use_dora and not self.supports_dora:
            raise ValueError(f"DoRA (use_dora) is implemented for Linear and Conv1D layers, not for {kind}")
        if init in WEIGHT_INITS and not self.supports_weight_init:
            raise ValueError(f"init={init!r} is implemented for Linear and Conv1D layers, not for {kind}")
        if (use_dora or init in WEIGHT_INITS) and not self.base_layer.weight.is_floating_point():
            raise ValueError(
                f"use_dora and init={init!r} need a floating-point base weight, not {self.base_layer.weight.dtype}"
            )

    def variant_for(self, init: str, use_dora: bool) -> LoraVariant:
        """The variant of a new adapter with these options (already checked by `check_variant`)."""
        return PLAIN

    def add_adapter(
        self,
        name: str,
        r: int,
        scaling: float,
        dropout: float,
        init: str,
        use_dora: bool = False,
        *,
        autocast_adapter_dtype: bool = True,
    ) -> None:
        """Add adapter `name`. Its trainable tensors are float32 master weights on a bf16 / fp16 (or quantized)
        base, unless `autocast_adapter_dtype=False` keeps them in the base weight's dtype; on a float32 or
        float64 base they take its dtype."""
        if name in self.scaling:
            raise ValueError(f"adapter {name!r} already exists on this layer")
        if r > self.max_rank():
            raise ValueError(f"r={r} exceeds min(in, out)={self.max_rank()} of this layer")
        self.check_variant(init, use_dora)
        variant = self.variant_for(init, use_dora)
        self._create_adapter(name, r)
        self.lora_dropout[name] = nn.Dropout(dropout) if dropout > 0 else nn.Identity()
        self.rank[name] = r
        self.scaling[name] = scaling
        self.variants[name] = variant
        variant.initialise(self, name, init)
        weight = self.base_layer.weight
        dtype = adapter_dtype(weight.dtype, autocast_adapter_dtype)
        for container in self.adapter_containers:
            holder = getattr(self, container)
            if isinstance(holder[name], nn.Module):
                holder[name].to(device=weight.device, dtype=dtype)  # in place for modules
            else:  # a bare Parameter: Tensor.to returns a copy, so the moved copy takes its place
                holder[name] = nn.Parameter(holder[name].detach().to(device=weight.device, dtype=dtype))
        variant.finish(self, name)

    def reset_adapter(self, name: str, init: str) -> None:
        """A random (kaiming-uniform as nn.Linear does, or N(0, 1/r²)), B zero: ΔW starts at exactly 0."""
        a, b = self.lora_a_weight(name), self.lora_b_weight(name)
        with torch.no_grad():
            if init == "gaussian":
                nn.init.normal_(a, std=1.0 / self.rank[name])
            else:
                nn.init.kaiming_uniform_(a, a=math.sqrt(5))
            nn.init.zeros_(b)

    def set_factors(self, name: str, b: torch.Tensor, a: torch.Tensor) -> None:
        """Overwrite adapter `name`'s B and A with the matrices `b` (out × r) and `a` (r × in), r its rank."""
        shapes = self.adapter_shapes(self.rank[name])
        with torch.no_grad():
            for container, value in zip(self.adapter_containers, (a, b)):
                target = self.adapter_tensor(container, name)
                target.copy_(value.reshape(shapes[container]).to(target.dtype))

    def delete_adapter(self, name: str) -> None:
        if name in self.merged_adapters:
            raise RuntimeError(f"adapter {name!r} is merged; unmerge before deleting it")
        self.variants[name].remove(self, name)
        for container in (*self.containers_for(name), "lora_dropout"):
            del getattr(self, container)[name]
        del self.scaling[name], self.rank[name], self.variants[name]
        self.active_adapters = [a for a in self.active_adapters if a != name]

    def set_active(self, names: Iterable[str]) -> None:
        self.active_adapters = [n for n in names if n in self.scaling]
        for name in self.adapter_names:
            trainable = name in self.active_adapters
            for container in self.containers_for(name):
                getattr(self, container)[name].requires_grad_(trainable)

    # -- merging ------------------------------------------------------------------------------
    def check_mergeable(self, names: list[str]) -> None:
        """RuntimeError, before anything changes, when one of `names` is already merged (or named twice)."""
        merged = set(self.merged_adapters)
        for name in names:
            if name in merged:
                raise RuntimeError(f"adapter {name!r} is already merged")
            merged.add(name)

    def merge(self, names: Iterable[str], *, reversible: bool = True) -> None:
        """Fold the adapters `names` into the base weight. `reversible` keeps the exact base tensors (at the
        layer's first merge) so that `unmerge` restores them bit for bit."""
        names = list(names)
        self.check_mergeable(names)
        if not names:
            return
        if reversible and not self.merged_adapters:
            self.unmerged_state = {k: v.detach().clone() for k, v in self.base_layer.state_dict().items()}
        self.merge_into_base(names)

    def unmerge(self) -> None:
        """Take every merged adapter out: the kept exact base tensors, or (without them) a subtraction."""
        if not self.merged_adapters:
            return
        if self.unmerged_state is None:
            self.subtract_merged()
            return
        with torch.no_grad():
            self.base_layer.load_state_dict(self.unmerged_state)  # copies in place: the same bits as before
        self.unmerged_state = None
        self.merged_adapters.clear()
        self.forget_merges()

    def merge_into_base(self, names: list[str]) -> None:
        """Add each adapter's update to the base weight (rounded once) and record it as merged."""
        base_weight = self.base_layer.weight
        for name in names:
            with torch.no_grad():
                add_to_weight_(base_weight, self.delta_weight(name))
            self.merged_adapters.append(name)

    def subtract_merged(self) -> None:
        """Subtract every merged adapter's update again (exact up to float rounding) and forget the merges."""
        base_weight = self.base_layer.weight
        while self.merged_adapters:
            name = self.merged_adapters.pop()
            with torch.no_grad():
                add_to_weight_(base_weight, -self.delta_weight(name))
        self.forget_merges()

    def forget_merges(self) -> None:
        """Drop what a layer type records about its merges once none is left (nothing here)."""

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
            result = result + self.adapter_output(name, x, base_out).to(result.dtype)
        return result

    def extra_repr(self) -> str:
        ranks = ", ".join(f"{n}: r={self.rank[n]}" for n in self.adapter_names)
        return f"adapters=[{ranks}], active={self.active_adapters}, merged={self.merged_adapters}"
