"""Which modules of a model a rule names: the matching rules of `target_modules`, `exclude_modules`,
`modules_to_save` and `skip` lists, the transformer-layer index of a module path, the output head, the
classification heads, and weights tied between modules.

These rules read only module paths and the model's structure; they know no LoRA layer and no adapter, so
every area (injection, loading, quantization, the methods) shares the one implementation.
"""

from __future__ import annotations

import re

from torch import nn

# Classification heads are new (randomly initialised), so they train in full beside any method and are
# kept in float by quantization.
HEAD_NAMES = ("classifier", "score")

# Without `layers_pattern`, any path component followed by a number counts as the layer list.
_ANY_LAYER_LIST = r"[^.]+"


def name_matches(spec: list[str] | str, path: str) -> bool:
    """Whether module `path` is named by `spec`: a string is a regular expression the whole path must
    match; a list names modules by their last path components (`"q_proj"` matches `"layers.0.attn.q_proj"`
    but not `"layers.0.attn.xq_proj"`)."""
    if isinstance(spec, str):
        return re.fullmatch(spec, path) is not None
    return any(path == name or path.endswith(f".{name}") for name in spec)


def layer_index(path: str, layers_pattern: list[str] | str | None) -> int | None:
    """The index of the layer `path` lies in (`"model.layers.3.mlp"` → 3): the number after the first
    component matching one of `layers_pattern` (any component when None); None outside numbered layers."""
    patterns = [layers_pattern] if isinstance(layers_pattern, str) else (layers_pattern or [_ANY_LAYER_LIST])
    for pattern in patterns:
        match = re.search(rf"(?:^|\.)(?:{pattern})\.(\d+)(?:\.|$)", path)
        if match:
            return int(match.group(1))
    return None


def output_head(model: nn.Module) -> nn.Module | None:
    """The module producing the model's output logits (a language model's `lm_head`), None if it has none."""
    getter = getattr(model, "get_output_embeddings", None)
    try:
        return getter() if getter else None
    except (AttributeError, NotImplementedError):  # models without a head raise either, depending on the class
        return None


def head_names(model: nn.Module) -> list[str]:
    """The classification heads (among `HEAD_NAMES`) the model has as top-level modules."""
    return [name for name in HEAD_NAMES if isinstance(getattr(model, name, None), nn.Module)]


def own_weight(module: nn.Module) -> nn.Parameter | None:
    """The `weight` Parameter registered on `module` itself (not a submodule's, not a computed property)."""
    return dict(module.named_parameters(recurse=False)).get("weight")


def weight_owners(model: nn.Module) -> dict[int, list[str]]:
    """id of each weight Parameter → the paths of every module holding it; more than one path means tied."""
    owners: dict[int, list[str]] = {}
    for path, module in model.named_modules(remove_duplicate=False):
        weight = own_weight(module)
        if weight is not None:
            owners.setdefault(id(weight), []).append(path)
    return owners


__all__ = ["HEAD_NAMES", "head_names", "layer_index", "name_matches", "output_head", "own_weight", "weight_owners"]
