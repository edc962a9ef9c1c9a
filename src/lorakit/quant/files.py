"""Saving and loading a quantized base model as one safetensors file.

`QuantLinear` keeps its codes and scales as buffers, so `model.state_dict()` already holds everything;
the file adds, in its metadata, which layers are quantized and how (method, block size, double
quantization, original dtype), so that loading can rebuild the layers before filling them:

    lorakit.quant.save_quantized(model, "base-nf4.safetensors")
    model = AutoModelForCausalLM.from_config(config)        # any float model of the same architecture
    lorakit.quant.load_quantized(model, "base-nf4.safetensors")

Only the base is saved: LoRA tensors are left out (adapters have their own files, `lorakit.save_adapter`)
and wrapper paths are written as the plain model's (`q_proj.base_layer.x` → `q_proj.x`). Tied tensors
are stored once and recorded as aliases. Loading checks the file (header against data, bounded sizes,
finite floats: `lorakit.safe_files`), then every key, shape and dtype against the model, and reads every
tensor before changing the model.
"""

from __future__ import annotations

import json
import os
import re
from pathlib import Path
from typing import cast

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import atomic_write
from ..safe_files import DTYPES, UnsafeFileError, layout_of_file, read_safetensors
from .linear import QuantLinear, codec_from_spec, is_quantized, quantized_layers

_LAYERS_KEY = "lorakit.quantized_layers"
_ALIASES_KEY = "lorakit.aliases"
# State-dict parts that belong to adapters or to their wrappers, not to the base model.
_ADAPTER_PART = re.compile(r"(^|\.)(lora_[^.]+|lora_dropout|modules_to_save)\.")


def _base_key(key: str) -> str | None:
    """The plain model's name of a state-dict key, or None for adapter tensors."""
    if _ADAPTER_PART.search(key):
        return None
    return key.replace(".base_layer.", ".").replace(".original_module.", ".")


def _dtype_name(dtype: torch.dtype) -> str:
    return str(dtype).removeprefix("torch.")


def save_quantized(model: nn.Module, path: str | os.PathLike) -> Path:
    """Write the (quantized) base model's tensors and the quantization layout to one safetensors file."""
    layers = {}
    for layer_path, layer in quantized_layers(model):
        owner = layer_path.removesuffix(".base_layer")
        if layer_path != owner and model.get_submodule(owner).merged_adapters:
            raise ValueError(
                f"{owner} has merged adapters; unmerge first (or merge_and_unload to save the merged model)"
            )
        layers[owner] = {
            **layer.codec.spec(),
            "in_features": layer.in_features,
            "out_features": layer.out_features,
            "bias": layer.bias is not None,
            "dtype": _dtype_name(layer.compute_dtype),
        }
    if not layers:
        raise ValueError("the model has no quantized layer; save it with save_pretrained or safetensors instead")
    tensors: dict[str, torch.Tensor] = {}
    aliases: dict[str, str] = {}
    seen: dict[tuple, str] = {}
    for key, value in model.state_dict().items():
        name = _base_key(key)
        if name is None:
            continue
        identity = (value.data_ptr(), value.dtype, tuple(value.shape), value.stride())
        if value.numel() and identity in seen:  # a tied tensor: store it once
            aliases[name] = seen[identity]
            continue
        seen[identity] = name
        tensor = value.detach().to("cpu")
        # safetensors refuses views into a larger storage; such tensors are copied.
        if tensor.untyped_storage().nbytes() != tensor.numel() * tensor.element_size() or not tensor.is_contiguous():
            tensor = tensor.clone(memory_format=torch.contiguous_format)
        tensors[name] = tensor
    metadata = {"format": "pt", _LAYERS_KEY: json.dumps(layers), _ALIASES_KEY: json.dumps(aliases)}
    out = Path(path)
    out.parent.mkdir(parents=True, exist_ok=True)
    atomic_write(out, lambda tmp: save_file(tensors, tmp, metadata=metadata))
    return out


def load_quantized(model: nn.Module, path: str | os.PathLike) -> nn.Module:
    """Load a file written by `save_quantized` into a float model of the same architecture (e.g. built
    with `from_config`): the listed linear layers become empty QuantLinear layers, then every tensor is
    loaded. Raises ValueError, with the model unchanged, if the file does not fit it. Returns the model."""
    file = Path(path)
    if not file.is_file():
        raise FileNotFoundError(f"quantized model file not found: {file}")
    if is_quantized(model):
        raise ValueError("the model is already quantized; load into a float model")
    layers, aliases, entries = _read_layout(file)
    _check_fits(model, file, layers, aliases, entries)
    tensors, _ = read_safetensors(file, file)  # every tensor read (and checked) before the model changes
    for alias, target in aliases.items():
        tensors[alias] = tensors[target]
    for layer_path, spec in layers.items():
        linear = cast(nn.Linear, model.get_submodule(layer_path))  # _check_fits found a Linear there
        layer = QuantLinear(
            spec["in_features"],
            spec["out_features"],
            spec["method"],
            bias=spec["bias"],
            dtype=getattr(torch, spec["dtype"]),
            device=linear.weight.device,
            block_size=spec.get("block_size", 64),
            double_quant=spec.get("double_quant", True),
        )
        model.set_submodule(layer_path, layer)
    model.load_state_dict(tensors, strict=True)
    for _, layer in quantized_layers(model):
        if layer.bias is not None:
            layer.bias.requires_grad_(False)  # a quantized base is frozen, bias included
    return model


def _read_layout(file: Path) -> tuple[dict[str, dict], dict[str, str], dict[str, tuple[str, tuple[int, ...]]]]:
    """The file's quantized layers (path → spec), its aliases (tied key → stored key) and every tensor's
    (dtype, shape), from its checked header alone."""
    layout = layout_of_file(file)
    if _LAYERS_KEY not in layout.metadata:
        raise ValueError(f"{file} holds no lorakit quantization layout (not written by save_quantized)")
    try:
        layers, aliases = json.loads(layout.metadata[_LAYERS_KEY]), json.loads(layout.metadata.get(_ALIASES_KEY, "{}"))
    except (ValueError, RecursionError):
        raise UnsafeFileError(f"{file}: its quantization layout is not valid JSON") from None
    if not (isinstance(layers, dict) and all(isinstance(s, dict) for s in layers.values())):
        raise UnsafeFileError(f"{file}: its quantization layout must map layer paths to specs")
    if not (isinstance(aliases, dict) and all(isinstance(v, str) and v in layout.tensors for v in aliases.values())):
        raise UnsafeFileError(f"{file}: its aliases must name tensors the file holds")
    return layers, aliases, {key: (entry.dtype, entry.shape) for key, entry in layout.tensors.items()}


def _check_fits(
    model: nn.Module,
    file: Path,
    layers: dict[str, dict],
    aliases: dict[str, str],
    entries: dict[str, tuple[str, tuple[int, ...]]],
) -> None:
    """Raise ValueError unless the file holds exactly the keys, shapes and dtypes of `model` once its layers are
    quantized (floating-point tensors may be of another float dtype; codes and integer tensors may not)."""
    expected = {k: (v.dtype, tuple(v.shape)) for k, v in model.state_dict().items()}
    for layer_path, spec in layers.items():
        expected.pop(f"{layer_path}.weight", None)
        empty = _quantized_buffers(model, file, layer_path, spec)
        expected.update({f"{layer_path}.{name}": (t.dtype, tuple(t.shape)) for name, t in empty.items()})
    available = {**entries, **{alias: entries[target] for alias, target in aliases.items()}}
    missing = sorted(set(expected) - set(available))
    unexpected = sorted(set(available) - set(expected))
    if missing or unexpected:
        raise ValueError(
            f"{file} does not fit {type(model).__name__}: missing {missing[:5]}, unexpected {unexpected[:5]}"
        )
    for key, (dtype, shape) in expected.items():
        file_dtype, file_shape = DTYPES[available[key][0]], available[key][1]
        if file_shape != shape:
            raise ValueError(f"{file}: {key} has shape {file_shape} in the file but {shape} in the model")
        if file_dtype != dtype and not (file_dtype.is_floating_point and dtype.is_floating_point):
            raise ValueError(f"{file}: {key} is {file_dtype} in the file but {dtype} in the model")


def _quantized_buffers(model: nn.Module, file: Path, layer_path: str, spec: dict) -> dict[str, torch.Tensor]:
    """The (meta) buffers a quantized layer described by `spec` holds, after checking the spec against the model."""
    try:
        module = model.get_submodule(layer_path)
    except AttributeError:
        raise ValueError(f"{file}: layer {layer_path!r} does not exist in {type(model).__name__}") from None
    shape = (spec.get("in_features"), spec.get("out_features"))
    if not isinstance(module, nn.Linear) or (module.in_features, module.out_features) != shape:
        raise ValueError(
            f"{file}: layer {layer_path!r} is a {shape[0]}→{shape[1]} linear layer in the file "
            f"but {module} in the model"
        )
    compute_dtype = getattr(torch, str(spec.get("dtype")), None)
    floating = isinstance(compute_dtype, torch.dtype) and compute_dtype.is_floating_point
    if not (isinstance(spec.get("bias"), bool) and isinstance(spec.get("double_quant", True), bool) and floating):
        raise ValueError(f"{file}: layer {layer_path!r} has a malformed spec {spec}")
    try:
        return codec_from_spec(spec).empty(module.out_features, module.in_features, "meta")
    except (KeyError, TypeError, ValueError) as err:
        raise ValueError(f"{file}: layer {layer_path!r} has a malformed spec: {err}") from None


__all__ = ["load_quantized", "save_quantized"]
