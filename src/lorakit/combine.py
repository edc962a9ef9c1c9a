"""Adapter arithmetic: a new named adapter made from a weighted combination of adapters already on the model.

    lorakit.combine(model, {"sql": 0.7, "chat": 0.3}, method="cat", name="mix")
    lorakit.set_adapter(model, "mix")

Every adapter i has, on each layer it adapts, an update ΔW_i = s_i·B_i·A_i relative to the base weight W0
(for PiSSA / OLoRA adapters s_i·(B_i·A_i − B0_i·A0_i); for DoRA the whole change m ⊙ (W0 + ΔW)/‖·‖ − W0).
The methods:

- "cat": B = [B_1, B_2, …], A = [w_1·s_1·A_1; w_2·s_2·A_2; …]. Exact: the new update is Σ w_i·ΔW_i; its rank
  is the sum of the ranks (capped at min(in, out), where an exact SVD of the sum takes over).
- "linear": A = Σ ±√|w_i·s_i|·A_i and B = Σ √|w_i·s_i|·B_i, entry by entry, as PEFT does. Needs equal
  ranks; cheap, but not Σ w_i·ΔW_i (cross terms B_i·A_j appear) unless there is one adapter.
- "svd": Σ w_i·ΔW_i truncated to rank `rank` by SVD (the best rank-`rank` approximation); exact when `rank`
  reaches the rank of the sum.
- "ties" (Yadav et al. 2023, "TIES-Merging"): each ΔW_i keeps its `density` fraction of largest-magnitude
  entries (trim); each entry's sign is elected from the weighted sum of the trimmed updates; the weighted
  updates that agree with the elected sign are averaged (disjoint mean); the result is truncated by SVD.

The new adapter has scaling 1 (alpha = r, per-layer ranks in rank_pattern / alpha_pattern) and is a plain
LoRA adapter relative to W0, so it saves to and loads from PEFT's format like any other. DoRA adapters can be
combined with "svd" and "ties" only (their change is not low-rank). A module trained in full
(`modules_to_save`, e.g. a classification head) is copied from the one adapter that has it; two adapters with
their own copy of the same module cannot be combined.
"""

from __future__ import annotations

import math
import re
from dataclasses import replace

import torch
from torch import nn

from .config import LoraConfig
from .inject import add_adapter, check_new_name, merged_names
from .layers import LoraLayer
from .saved_module import TrainableCopy
from .state import adapter_config, lora_layers, require_adapters, saved_copies

METHODS = ("cat", "linear", "svd", "ties")


def combine(
    model: nn.Module,
    weights: dict[str, float],
    method: str = "cat",
    name: str = "combined",
    rank: int | None = None,
    density: float = 0.2,
    activate: bool = False,
) -> nn.Module:
    """Add adapter `name`, the combination of the adapters in `weights` ({adapter name: weight}).

    Args:
        method: "cat" (exact), "linear", "svd" or "ties"; see the module docstring.
        rank: rank of the result for "svd" and "ties" (default: the largest rank among the inputs).
        density: fraction of entries each update keeps before the TIES sign election (0 < density ≤ 1).
        activate: make the new adapter the active one (otherwise the active set stays as it is).
    """
    names = _check_arguments(model, weights, method, name, rank, density)
    configs = {n: adapter_config(model, n) for n in names}
    factors: dict[str, tuple[torch.Tensor, torch.Tensor]] = {}  # path -> (B, A) as matrices (out×r, r×in)
    with torch.no_grad():
        for path, layer in lora_layers(model):
            present = [n for n in names if n in layer.scaling]
            if present:
                factors[path] = _combine_layer(
                    path, layer, {n: float(weights[n]) for n in present}, method, rank, density
                )
    if not factors:
        raise ValueError(f"adapters {names} adapt no layer")
    saved_sources = _saved_sources(model, names)
    add_adapter(model, _combined_config(configs, factors), name, activate=activate)

    layers = dict(lora_layers(model))
    for path, (b, a) in factors.items():
        layers[path].set_factors(name, b, a)
    with torch.no_grad():
        for copy, source in saved_sources:
            copy.modules_to_save[name].load_state_dict(copy.modules_to_save[source].state_dict())
    return model


def _combined_config(
    configs: dict[str, LoraConfig], factors: dict[str, tuple[torch.Tensor, torch.Tensor]]
) -> LoraConfig:
    """The new adapter's config: the first input's, with each layer's rank of its combined factors and scaling 1
    (alpha = r), targeting exactly the combined layers, plain LoRA (the factors already hold everything)."""
    ranks = {path: b.shape[1] for path, (b, _) in factors.items()}
    top = max(ranks.values())
    others = {re.escape(path): r for path, r in ranks.items() if r != top}
    saved_names = sorted({m for c in configs.values() for m in (c.modules_to_save or [])}) or None
    return replace(
        next(iter(configs.values())),
        r=top,
        alpha=float(top),
        rank_pattern=others,
        alpha_pattern={k: float(v) for k, v in others.items()},
        target_modules=sorted(factors),
        exclude_modules=None,
        layers_to_transform=None,
        layers_pattern=None,
        bias="none",
        modules_to_save=saved_names,
        init="kaiming",
        use_rslora=False,
        use_dora=False,
    )


def _check_arguments(
    model: nn.Module, weights: dict[str, float], method: str, name: str, rank: int | None, density: float
) -> list[str]:
    if not isinstance(weights, dict) or not weights:
        raise ValueError('weights must be a non-empty {adapter name: weight} mapping, e.g. {"a": 0.7, "b": 0.3}')
    names = list(weights)
    require_adapters(model, names)
    for key, value in weights.items():
        if isinstance(value, bool) or not isinstance(value, (int, float)) or not math.isfinite(value):
            raise ValueError(f"the weight of {key!r} must be a finite number, got {value!r}")
    if method not in METHODS:
        raise ValueError(f"method must be one of {METHODS}, got {method!r}")
    check_new_name(model, name)
    if merged_names(model):
        raise RuntimeError(f"adapters {merged_names(model)} are merged; unmerge before combining")
    if rank is not None:
        if method not in ("svd", "ties"):
            raise ValueError(f"rank applies to the svd and ties methods; {method!r} sets the rank itself")
        if isinstance(rank, bool) or not isinstance(rank, int) or rank <= 0:
            raise ValueError(f"rank must be a positive integer, got {rank!r}")
    if not (isinstance(density, (int, float)) and 0 < density <= 1):
        raise ValueError(f"density must be in (0, 1], got {density!r}")
    if method in ("cat", "linear"):
        dora = [n for n in names if adapter_config(model, n).use_dora]
        if dora:
            raise ValueError(f"DoRA adapters {dora} change the weight by more than a low-rank update; use svd or ties")
    return names


# -- one layer ------------------------------------------------------------------------------------
def _combine_layer(
    path: str, layer: LoraLayer, weights: dict[str, float], method: str, rank: int | None, density: float
) -> tuple[torch.Tensor, torch.Tensor]:
    if method == "cat":
        pairs = [layer.lora_factors(n) for n in weights]
        total = sum(b.shape[1] for b, _ in pairs)
        if total <= layer.max_rank():
            b = torch.cat([b for b, _ in pairs], dim=1)
            a = torch.cat([w * layer.scaling[n] * a for (_, a), (n, w) in zip(pairs, weights.items())], dim=0)
            return b, a
        # More directions than the layer has: the SVD of the sum at full rank is still exact.
        return _truncate(_weighted_sum(layer, weights), layer.max_rank())
    if method == "linear":
        by_name = {n: layer.lora_factors(n) for n in weights}
        ranks = {n: b.shape[1] for n, (b, _) in by_name.items()}
        if len(set(ranks.values())) > 1:
            raise ValueError(
                f"{path}: linear combines A and B entry by entry and needs equal ranks, got {ranks}; use cat or svd"
            )
        first_b, first_a = next(iter(by_name.values()))
        b_sum, a_sum = torch.zeros_like(first_b), torch.zeros_like(first_a)
        for n, w in weights.items():
            b, a = by_name[n]
            scale = w * layer.scaling[n]
            root = math.sqrt(abs(scale))
            b_sum = b_sum + root * b
            a_sum = a_sum + math.copysign(root, scale) * a  # the sign on one side only
        return b_sum, a_sum
    target = rank or max(layer.lora_factors(n)[0].shape[1] for n in weights)
    target = min(target, layer.max_rank())
    if method == "svd":
        return _truncate(_weighted_sum(layer, weights), target)
    deltas = [_update(layer, n) for n in weights]
    return _truncate(ties_merge(deltas, list(weights.values()), density), target)


def _update(layer: LoraLayer, name: str) -> torch.Tensor:
    """The adapter's whole change of the weight (DoRA included) as an (out × in) matrix, in float32."""
    return layer.to_matrix_layout(layer.delta_weight(name)).to(torch.float32)


def _weighted_sum(layer: LoraLayer, weights: dict[str, float]) -> torch.Tensor:
    terms = [w * _update(layer, n) for n, w in weights.items()]
    total = terms[0]
    for term in terms[1:]:
        total = total + term
    return total


def _truncate(matrix: torch.Tensor, rank: int) -> tuple[torch.Tensor, torch.Tensor]:
    """(B, A) = (U_r·S_r, V_rᵀ): the best rank-`rank` approximation of `matrix`."""
    u, s, vh = torch.linalg.svd(matrix, full_matrices=False)
    return u[:, :rank] * s[:rank], vh[:rank]


def trim(delta: torch.Tensor, density: float) -> torch.Tensor:
    """`delta` with all but its round(density · numel) largest-magnitude entries set to zero."""
    keep = max(1, round(density * delta.numel()))
    if keep >= delta.numel():
        return delta.clone()
    flat = delta.flatten()
    mask = torch.zeros_like(flat, dtype=torch.bool)
    mask[flat.abs().topk(keep).indices] = True
    return (flat * mask).view_as(delta)


def ties_merge(deltas: list[torch.Tensor], weights: list[float], density: float) -> torch.Tensor:
    """TIES-Merging of equally shaped updates: trim, elect the sign of Σ w_i·trim(Δ_i), average the agreeing
    weighted entries."""
    weighted = torch.stack([w * trim(d, density) for d, w in zip(deltas, weights)])
    elected = torch.sign(weighted.sum(dim=0))
    agree = (torch.sign(weighted) == elected) & (weighted != 0)
    count = agree.sum(dim=0).clamp(min=1)
    return (weighted * agree).sum(dim=0) / count


# -- modules trained in full ----------------------------------------------------------------------
def _saved_sources(model: nn.Module, names: list[str]) -> list[tuple[TrainableCopy, str]]:
    """(wrapper, adapter whose copy the new adapter takes) for every modules_to_save wrapper involved."""
    sources = []
    for path, copy in saved_copies(model):
        owners = [n for n in names if n in copy.modules_to_save]
        if len(owners) > 1:
            raise ValueError(
                f"adapters {owners} each train their own copy of {path!r}; two trained modules cannot be combined"
            )
        if owners:
            sources.append((copy, owners[0]))
    return sources


__all__ = ["METHODS", "combine", "ties_merge", "trim"]
