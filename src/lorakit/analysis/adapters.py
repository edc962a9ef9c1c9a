"""From saved adapter folders to the matrices the analysis works on: each adapted layer's factors B, A and
scaling (ΔW = scaling · B · A in (out × in) layout, whatever the base layer's storage), the base model's W in
the same layout (GPT-2's Conv1D stores (in × out) and is transposed), and the checks that two adapters can be
compared layer by layer.

Only plain LoRA on linear layers (nn.Linear, Conv1D) is analysed: embedding and convolution adapters are
listed as skipped; DoRA, PiSSA and OLoRA adapters, whose update is not scaling · B · A, are refused.
"""

from __future__ import annotations

import os
from dataclasses import dataclass, field
from pathlib import Path

import torch
from torch import nn

from ..config import WEIGHT_INITS, LoraConfig
from ..io import read_adapter
from ..layers import LoraLayer, lora_class_for
from .spectrum import SVD, delta_svd

_A, _B = ".lora_A.weight", ".lora_B.weight"


@dataclass(frozen=True)
class AdaptedLayer:
    """One linear layer's update ΔW = scaling · b · a, with a (r × in) and b (out × r)."""

    path: str
    a: torch.Tensor
    b: torch.Tensor
    scaling: float

    @property
    def rank(self) -> int:
        return self.a.shape[0]

    @property
    def shape(self) -> tuple[int, int]:
        return self.b.shape[0], self.a.shape[1]

    def svd(self) -> SVD:
        return delta_svd(self.b, self.a, self.scaling)


@dataclass(frozen=True)
class AdapterFactors:
    """An adapter folder's config and its analysable layers, sorted by kind, then layer number."""

    folder: str
    config: LoraConfig
    layers: dict[str, AdaptedLayer]
    skipped: list[str] = field(default_factory=list)  # adapted modules that are not linear layers


def read_factors(folder: str | os.PathLike) -> AdapterFactors:
    """Read an adapter folder (lorakit's or PEFT's) into per-layer factors; ValueError for what cannot be analysed."""
    config, tensors = read_adapter(folder)
    if config.use_dora:
        raise ValueError(f"{folder} is a DoRA adapter; its update is not scaling·B·A, which this analysis needs")
    if config.init in WEIGHT_INITS:
        raise ValueError(
            f"{folder} is a {config.init} adapter (its update is relative to factors of W0); save it with "
            "save_adapter(..., convert_to_lora=True) to analyse it as plain LoRA"
        )
    layers: dict[str, AdaptedLayer] = {}
    skipped: list[str] = []
    for key in tensors:
        if ".lora_embedding_A" in key:
            skipped.append(key.split(".lora_embedding_A")[0])
        if not key.endswith(_A):
            continue
        path = key.removesuffix(_A)
        a, b = tensors[key], tensors.get(path + _B)
        if b is None:
            raise ValueError(f"{folder}: {path} has lora_A but no lora_B")
        if a.ndim != 2 or b.ndim != 2:  # a convolution's kernels
            skipped.append(path)
            continue
        layers[path] = AdaptedLayer(path, a, b, config.scaling_for(path))
    layers = {path: layers[path] for path in sorted(layers, key=layer_order)}
    if not layers:
        raise ValueError(
            f"{folder} adapts no linear layer (skipped: {', '.join(skipped) or 'none'}); nothing to analyse"
        )
    return AdapterFactors(str(folder), config, layers, skipped)


def check_comparable(first: AdapterFactors, second: AdapterFactors) -> None:
    """Raise ValueError unless both adapters adapt the same linear layers of the same base, in the same shapes."""
    base1, base2 = first.config.base_model_name_or_path, second.config.base_model_name_or_path
    if base1 and base2 and base1 != base2:
        raise ValueError(
            f"the adapters belong to different base models: {first.folder} to {base1}, {second.folder} to {base2}"
        )
    only1, only2 = sorted(set(first.layers) - set(second.layers)), sorted(set(second.layers) - set(first.layers))
    if only1 or only2:
        raise ValueError(
            f"the adapters adapt different modules: only in {first.folder}: {only1[:4] or 'none'}"
            f"{' …' if len(only1) > 4 else ''}; only in {second.folder}: {only2[:4] or 'none'}"
            f"{' …' if len(only2) > 4 else ''}"
        )
    for path, layer in first.layers.items():
        if layer.shape != second.layers[path].shape:
            raise ValueError(
                f"{path} is {layer.shape} in {first.folder} but {second.layers[path].shape} in {second.folder}"
            )


def load_base(config: LoraConfig, model: str | os.PathLike | nn.Module | None = None) -> nn.Module:
    """The base model: `model` itself when it is a module, else loaded from `model` or the adapter's own base."""
    if isinstance(model, nn.Module):
        return model
    from ..models import load_model  # transformers' auto classes: only when a base is needed

    name = str(model) if model is not None else config.base_model_name_or_path
    if not name:
        raise ValueError("the adapter does not name its base model; pass the model (--model)")
    task = "seq-cls" if config.task_type == "SEQ_CLS" else "causal-lm"
    base, _ = load_model(name, task)
    return base


def base_weight(model: nn.Module, layer: AdaptedLayer) -> torch.Tensor:
    """W of the module `layer` adapts, (out × in), checked against the adapter's shape."""
    try:
        module = model.get_submodule(layer.path)
    except AttributeError:
        raise ValueError(
            f"the base model ({type(model).__name__}) has no module {layer.path!r}; is it the adapter's base?"
        ) from None
    if isinstance(module, LoraLayer):  # a model that already carries adapters: its frozen base layer
        if module.merged_adapters:
            raise ValueError(f"{layer.path} has merged adapters; unmerge them to analyse the base weight")
        module = module.base_layer
    weight = getattr(module, "weight", None)
    if not isinstance(weight, torch.Tensor) or weight.ndim != 2:
        raise ValueError(f"{layer.path} is a {type(module).__name__}, not a linear layer")
    weight = weight.detach()
    lora_type = lora_class_for(module)
    if lora_type is not None and lora_type.fan_in_fan_out:  # stored (in × out), GPT-2's Conv1D
        weight = weight.T
    if tuple(weight.shape) != layer.shape:
        raise ValueError(
            f"{layer.path}: the adapter's ΔW is {layer.shape[0]} × {layer.shape[1]} but the base weight is "
            f"{weight.shape[0]} × {weight.shape[1]}; is it the adapter's base?"
        )
    return weight


def split_path(path: str) -> tuple[str, int | None]:
    """(kind, layer index) of a module path: "model.layers.3.self_attn.q_proj" → ("self_attn.q_proj", 3); a path
    without a numeric component is its own kind."""
    parts = path.split(".")
    for i, part in enumerate(parts):
        if part.isdigit():
            return ".".join(parts[i + 1 :]) or path, int(part)
    return path, None


def layer_order(path: str) -> tuple:
    """Sort key: by kind, then by layer number (2 before 10)."""
    kind, index = split_path(path)
    return kind, -1 if index is None else index, path


def folder_label(folder: str | os.PathLike) -> str:
    """A short name for an adapter folder in tables and plots."""
    return Path(folder).resolve().name or str(folder)


__all__ = [
    "AdaptedLayer",
    "AdapterFactors",
    "base_weight",
    "check_comparable",
    "folder_label",
    "layer_order",
    "load_base",
    "read_factors",
    "split_path",
]
