"""Adapter files in Hugging Face PEFT's layout: a folder with `adapter_config.json` and
`adapter_model.safetensors` holding only the adapter's tensors.

Keys are PEFT's: `base_model.model.<module path>.lora_A.weight` (adapter name removed), embeddings'
`...lora_embedding_A`, full copies of `modules_to_save` under the module's own path, and trained biases
under their path in the model.

Saving writes the config and weights as one unit (`lorakit.atomic.write_files`): a folder holding only the
adapter is replaced whole; in a folder that holds more (a training run's output) lorakit's readers still
never see new weights beside an old config. Reading refuses, with one line naming the file, configs and
safetensors files that are damaged, oversized or hostile and NaN / infinite weights (`lorakit.safe_files`);
`read_adapter_contents` applies the same checks to contents a caller read itself (the server, which opens
files without following links). Loading checks every key and shape against the model before changing it.
"""

from __future__ import annotations

import dataclasses
import json
import math
import os
import warnings
from pathlib import Path

import torch
from safetensors.torch import save_file
from torch import nn

from .atomic import committed_files, write_files
from .config import WEIGHT_INITS, LoraConfig
from .inject import InjectionPlan, apply_plan, plan_injection
from .layers import LoraLayer
from .safe_files import FLOAT_DTYPES, UnsafeFileError, check_finite, parse_json, read_bounded, read_safetensors
from .saved_module import TrainableCopy
from .state import adapter_config, lora_layers, saved_copies
from .targets import name_matches

CONFIG_NAME = "adapter_config.json"
WEIGHTS_NAME = "adapter_model.safetensors"
LEGACY_WEIGHTS_NAME = "adapter_model.bin"
PREFIX = "base_model.model."


class AdapterFileError(ValueError):
    """An adapter folder that cannot be read or does not fit the model."""


# -- saving ---------------------------------------------------------------------------------------
def adapter_state_dict(
    model: nn.Module, name: str = "default", convert_to_lora: bool = False
) -> dict[str, torch.Tensor]:
    """The adapter's tensors under PEFT's key names (copies on CPU). With `convert_to_lora`, a PiSSA / OLoRA
    adapter's A and B are those of the equivalent plain LoRA of the original base: [B, B0] and [A; −A0]."""
    config = adapter_config(model, name)
    tensors: dict[str, torch.Tensor] = {}
    for path, layer in lora_layers(model):
        if name in layer.scaling:
            for container in layer.containers_for(name):
                suffix = ".weight" if isinstance(getattr(layer, container)[name], nn.Module) else ""
                tensors[f"{path}.{container}{suffix}"] = layer.adapter_tensor(container, name)
            if convert_to_lora and config.init in WEIGHT_INITS:  # the frozen B0·A0 joins the factors
                tensors[f"{path}.lora_B.weight"], tensors[f"{path}.lora_A.weight"] = layer.lora_factors(name)
    for path, copy in saved_copies(model):
        if name in copy.modules_to_save:
            for key, value in copy.modules_to_save[name].state_dict().items():
                tensors[f"{path}.{key}"] = value
    if config.bias != "none":
        adapted = {f"{p}.base_layer" for p, layer in lora_layers(model) if name in layer.scaling}
        saved_paths = tuple(f"{p}." for p, _ in saved_copies(model))
        for key, value in model.state_dict().items():
            owner = key.rsplit(".", 1)[0]
            if not key.endswith("bias") or key.startswith(saved_paths) or ".lora_" in key:
                continue
            if config.bias == "all" or owner in adapted:
                tensors[key] = value
    return {PREFIX + k: unsharded(v).detach().to("cpu").contiguous().clone() for k, v in tensors.items()}


def converted_to_lora(config: LoraConfig) -> LoraConfig:
    """The config of a PiSSA / OLoRA adapter saved as plain LoRA: twice the rank, the same scaling."""
    factor = math.sqrt(2) if config.use_rslora else 2  # α/r → 2α/2r, or α/√r → √2·α/√(2r)
    return dataclasses.replace(
        config,
        init="kaiming",
        r=2 * config.r,
        alpha=factor * config.alpha,
        rank_pattern={k: 2 * v for k, v in config.rank_pattern.items()},
        alpha_pattern={k: factor * v for k, v in config.alpha_pattern.items()},
    )


def unsharded(tensor: torch.Tensor) -> torch.Tensor:
    """The whole tensor behind an FSDP2 shard (DTensor). A collective: every rank must call it."""
    return tensor.full_tensor() if hasattr(tensor, "full_tensor") else tensor


def save_adapter(
    model: nn.Module,
    path: str | os.PathLike,
    name: str = "default",
    *,
    write: bool = True,
    convert_to_lora: bool = False,
    **config_extra,
) -> Path:
    """Write adapter `name` to the folder `path` (created if needed), config and weights as one unit.

    `config_extra` adds fields to `adapter_config.json` (e.g. `base_model_name_or_path`, `task_type`).
    Under FSDP every rank must call this (the shards are gathered); pass `write=False` on all but one.

    A PiSSA / OLoRA adapter is saved as PEFT saves it (`init_lora_weights="pissa"`): the loader (lorakit or
    PEFT) redoes the decomposition of the original base weight. `convert_to_lora=True` instead writes the
    equivalent plain LoRA adapter of rank 2r relative to the original weights (ΔW = s·(B·A − B0·A0)), which
    any LoRA tool applies to the untouched base model; DoRA magnitudes are kept as they are.
    """
    out = Path(path)
    config = adapter_config(model, name)
    tensors = adapter_state_dict(model, name, convert_to_lora=convert_to_lora)
    if convert_to_lora and config.init in WEIGHT_INITS:
        config = converted_to_lora(config)
    if not write:
        return out
    config_dict = config.to_peft_dict()
    config_dict.update({k: v for k, v in config_extra.items() if v is not None})
    config_text = json.dumps(config_dict, indent=2, sort_keys=True)
    return write_files(
        out,
        {
            WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
            CONFIG_NAME: lambda tmp: Path(tmp).write_text(config_text),
        },
    )


# -- loading --------------------------------------------------------------------------------------
def read_adapter(path: str | os.PathLike) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """Read an adapter folder into its config and tensors (keys without PEFT's prefix)."""
    folder = Path(path)
    if not folder.is_dir():
        raise AdapterFileError(f"no adapter folder at {folder}")
    files = committed_files(folder, [WEIGHTS_NAME, CONFIG_NAME])
    if not files[CONFIG_NAME].is_file():
        raise AdapterFileError(f"{folder} has no {CONFIG_NAME}")
    try:
        config = _config_from_bytes(read_bounded(files[CONFIG_NAME]), files[CONFIG_NAME])
        if files[WEIGHTS_NAME].is_file():
            tensors, _ = read_safetensors(files[WEIGHTS_NAME], files[WEIGHTS_NAME], FLOAT_DTYPES)
        elif (folder / LEGACY_WEIGHTS_NAME).is_file():
            tensors = _read_legacy(folder / LEGACY_WEIGHTS_NAME)
        else:
            raise AdapterFileError(f"{folder} has no {WEIGHTS_NAME}")
    except UnsafeFileError as err:
        raise AdapterFileError(str(err)) from None
    return config, _adapter_tensors(tensors, files[WEIGHTS_NAME])


def read_adapter_contents(
    config_bytes: bytes, weights_bytes: bytes, where: str
) -> tuple[LoraConfig, dict[str, torch.Tensor]]:
    """`read_adapter` for the contents of `adapter_config.json` and `adapter_model.safetensors` that the caller
    read itself (e.g. opened without following links); `where` names the adapter in error messages. The same
    checks apply: bounded sizes, the safetensors header against the data before any tensor is allocated,
    float dtypes, finite values, a valid config."""
    try:
        config = _config_from_bytes(config_bytes, f"{where}/{CONFIG_NAME}")
        tensors, _ = read_safetensors(weights_bytes, f"{where}/{WEIGHTS_NAME}", FLOAT_DTYPES)
    except UnsafeFileError as err:
        raise AdapterFileError(str(err)) from None
    return config, _adapter_tensors(tensors, f"{where}/{WEIGHTS_NAME}")


def _config_from_bytes(data: bytes, where: str | os.PathLike) -> LoraConfig:
    document = parse_json(data, where)
    if not isinstance(document, dict):
        raise AdapterFileError(f"{where} must hold a JSON object, not {type(document).__name__}")
    try:
        return LoraConfig.from_peft_dict(document)
    except (TypeError, ValueError) as err:
        raise AdapterFileError(f"{where}: {err}") from None


def _read_legacy(file: Path) -> dict[str, torch.Tensor]:
    """PEFT's old pickle format, read with `weights_only=True` (no code runs), checked like safetensors."""
    try:
        tensors = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a bad or hostile pickle
        raise AdapterFileError(f"{file} cannot be read: {str(err).splitlines()[0]}") from None
    if not isinstance(tensors, dict) or not all(
        isinstance(k, str) and isinstance(v, torch.Tensor) and v.is_floating_point() for k, v in tensors.items()
    ):
        raise AdapterFileError(f"{file} must hold a mapping of names to floating-point tensors")
    check_finite(tensors, file)
    return tensors


def _adapter_tensors(tensors: dict[str, torch.Tensor], where: str | os.PathLike) -> dict[str, torch.Tensor]:
    if not tensors:
        raise AdapterFileError(f"{where} holds no tensors")
    return {k.removeprefix(PREFIX): v for k, v in tensors.items()}


def load_adapter(
    model: nn.Module,
    source: str | os.PathLike | tuple[LoraConfig, dict[str, torch.Tensor]],
    name: str = "default",
    activate: bool = True,
    *,
    autocast_adapter_dtype: bool = True,
) -> nn.Module:
    """Load an adapter folder (written by lorakit or PEFT) into `model` as adapter `name`. `source` is the
    folder, or what `read_adapter` / `read_adapter_contents` returned.

    As with `add_adapter`, the adapter's tensors are float32 over a bf16 / fp16 base unless
    `autocast_adapter_dtype=False` (then the base dtype, whatever the file holds).

    Every key and shape is checked before the model changes; on any error the model is untouched.
    """
    if isinstance(source, tuple):
        (config, tensors), where = source, "the adapter"
    else:
        (config, tensors), where = read_adapter(source), f"adapter at {source}"
    lora_keys, saved_keys, bias_keys = _sort_keys(model, config, tensors)
    by_module: dict[str, dict[str, torch.Tensor]] = {}
    for key in lora_keys:
        module_path, container = key.removesuffix(".weight").rsplit(".", 1)
        by_module.setdefault(module_path, {})[container] = tensors[key]
    try:
        plan = plan_injection(model, config, name, target_paths=sorted(by_module))
    except (ValueError, TypeError) as err:
        raise AdapterFileError(f"{where} does not fit this model: {err}") from None
    for module_path, layer, _ in plan.layers:
        _check_shapes(module_path, layer, config.rank_for(module_path), by_module[module_path], config.use_dora)
    saved_states = _match_saved_modules(plan, saved_keys)
    if any(layer.merged_adapters for _, layer in lora_layers(model)):
        raise RuntimeError("the model has merged adapters; unmerge before loading another")

    apply_plan(model, plan, name, activate, autocast_adapter_dtype=autocast_adapter_dtype)
    with torch.no_grad():
        for module_path, layer, _ in plan.layers:
            for container, value in by_module[module_path].items():
                target = layer.adapter_tensor(container, name)
                target.copy_(value.to(target.dtype))
        for param, value in bias_keys:
            param.copy_(value.to(param.dtype))
    for copy, state in saved_states:
        copy.modules_to_save[name].load_state_dict(state, strict=True)
    return model


def _sort_keys(model: nn.Module, config: LoraConfig, tensors: dict[str, torch.Tensor]):
    """Split file keys into LoRA tensors, modules_to_save tensors and trained biases; reject the rest."""
    params = dict(model.named_parameters())
    lora_keys: list[str] = []
    saved_keys: dict[str, torch.Tensor] = {}
    bias_keys: list[tuple[nn.Parameter, torch.Tensor]] = []
    for key, value in tensors.items():
        if ".lora_" in key:
            lora_keys.append(key)
        elif config.modules_to_save and _under_saved_module(key, config.modules_to_save):
            if ".original_module." not in key:  # PEFT (bias="all") also stores the untouched original head
                saved_keys[key.replace(".modules_to_save.", ".")] = value
        elif key.endswith(".base_layer.weight"):
            _check_frozen_copy(key, value, params)
        elif key.endswith("bias"):
            plain = key.replace(".base_layer.", ".")
            param = params.get(plain, params.get(plain.replace(".bias", ".base_layer.bias")))
            if param is None:
                raise AdapterFileError(f"the adapter trains bias {key!r}, which this model does not have")
            if param.shape != value.shape:
                raise AdapterFileError(
                    f"bias {key!r} has shape {tuple(value.shape)} in the file but {tuple(param.shape)} in the model"
                )
            bias_keys.append((param, value))
        else:
            raise AdapterFileError(f"unexpected tensor {key!r} in the adapter file")
    if not lora_keys:
        raise AdapterFileError("the adapter file holds no LoRA tensors")
    return lora_keys, saved_keys, bias_keys


def _check_frozen_copy(key: str, value: torch.Tensor, params: dict[str, nn.Parameter]) -> None:
    """PEFT stores the frozen embedding matrix beside embedding adapters (for resized vocabularies).
    lorakit keeps the model's own; it must be the same matrix, or the adapter belongs to another base."""
    plain = key.replace(".base_layer.", ".")
    own = params.get(plain, params.get(key))
    if own is None:
        raise AdapterFileError(f"the adapter holds {key!r}, which this model does not have")
    if own.shape != value.shape:
        raise AdapterFileError(
            f"{key!r} has shape {tuple(value.shape)} in the file but {tuple(own.shape)} in the model "
            "(was the vocabulary resized? resize the model's embeddings first)"
        )
    if not torch.equal(own.detach().cpu().to(value.dtype), value):
        warnings.warn(
            f"{key!r} in the adapter differs from the model's weights; lorakit keeps the model's", stacklevel=3
        )


def _under_saved_module(key: str, saved_names: list[str]) -> bool:
    parts = key.split(".")
    return any(name_matches(saved_names, ".".join(parts[:i])) for i in range(1, len(parts)))


def _check_shapes(
    module_path: str, layer: LoraLayer, r: int, found: dict[str, torch.Tensor], use_dora: bool = False
) -> None:
    expected = layer.adapter_shapes(r)
    if use_dora:  # DoRA: one magnitude per output feature (only layers with supports_dora get here)
        expected["lora_magnitude_vector"] = layer.magnitude_shape()
    if set(found) != set(expected):
        raise AdapterFileError(
            f"{module_path}: the file has {sorted(found)}, "
            f"a {type(layer.base_layer).__name__} adapter needs {sorted(expected)}"
        )
    for container, shape in expected.items():
        got = tuple(found[container].shape)
        if got != shape:
            raise AdapterFileError(
                f"{module_path}.{container}: shape {got} in the file, but this model needs {shape} "
                f"(r={r}, layer {layer.in_features}→{layer.out_features})"
            )


def _match_saved_modules(plan: InjectionPlan, saved_keys: dict[str, torch.Tensor]) -> list[tuple[TrainableCopy, dict]]:
    states = []
    for copy_path, copy, _ in plan.saved:
        own = {k[len(copy_path) + 1 :]: v for k, v in saved_keys.items() if k.startswith(copy_path + ".")}
        reference = copy.original_module.state_dict()
        if set(own) != set(reference):
            raise AdapterFileError(
                f"modules_to_save {copy_path!r}: the file has {sorted(own)}, the model has {sorted(reference)}"
            )
        for key, value in own.items():
            if value.shape != reference[key].shape:
                raise AdapterFileError(
                    f"{copy_path}.{key}: shape {tuple(value.shape)} in the file, "
                    f"{tuple(reference[key].shape)} in the model"
                )
        states.append((copy, own))
    claimed = {key for key in saved_keys if any(key.startswith(f"{path}.") for path, _, _ in plan.saved)}
    orphans = sorted(set(saved_keys) - claimed)
    if orphans:
        raise AdapterFileError(f"the adapter holds full modules this model does not have: {orphans[:5]}")
    return states


__all__ = [
    "AdapterFileError",
    "adapter_state_dict",
    "load_adapter",
    "read_adapter",
    "read_adapter_contents",
    "save_adapter",
]
