"""A method's own files: a folder with `method_config.json` (the method, its options, and what the caller
adds: base model, task type) and `method_model.safetensors` (every trainable tensor under its parameter
name: the method's own, a classification head's, or all of them for full fine-tuning).

Writing replaces each file atomically; loading applies the method to a fresh base, checks every key and
shape against the model, and only then copies the values (on any error the model is left as it was).
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from safetensors import SafetensorError
from safetensors.torch import load_file, save_file
from torch import nn

from ..atomic import atomic_write
from ..io import unsharded
from .base import MethodOptions, method_state
from .registry import apply_method, implementation, remove_method

CONFIG_NAME = "method_config.json"
WEIGHTS_NAME = "method_model.safetensors"


def is_method_folder(path: str | os.PathLike) -> bool:
    return (Path(path) / CONFIG_NAME).is_file()


def method_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by parameter name, on the CPU (a collective under FSDP: every rank must call it)."""
    return {n: unsharded(p).detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def save_method(model: nn.Module, path: str | os.PathLike, *, write: bool = True, **config_extra: Any) -> Path:
    """Write the applied method's trainable tensors and config to the folder `path` (created if needed).
    `config_extra` adds fields to the config (e.g. base_model_name_or_path, task_type). Under FSDP every
    rank must call this; pass `write=False` on all but one."""
    out = Path(path)
    state = method_state(model)
    if state is None:
        raise ValueError("the model has no method applied (LoRA adapters are saved with lorakit.save_adapter)")
    tensors = method_tensors(model)
    if not write:
        return out
    config = {"method": state.name, "options": state.options.pick(implementation(state.name).OPTIONS),
              **{k: v for k, v in config_extra.items() if v is not None}}
    text = json.dumps(config, indent=2, sort_keys=True)
    out.mkdir(parents=True, exist_ok=True)
    atomic_write(out / WEIGHTS_NAME, lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}))
    atomic_write(out / CONFIG_NAME, lambda tmp: Path(tmp).write_text(text))
    return out


def read_method(path: str | os.PathLike) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A method folder's config (validated) and tensors."""
    folder = Path(path)
    config_file, weights = folder / CONFIG_NAME, folder / WEIGHTS_NAME
    if not folder.is_dir():
        raise FileNotFoundError(f"no method folder at {folder}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}")
    try:
        config = json.loads(config_file.read_text())
    except json.JSONDecodeError as err:
        raise ValueError(f"{config_file} is not valid JSON: {err}") from None
    if not isinstance(config, dict) or not isinstance(config.get("options", {}), dict):
        raise ValueError(f"{config_file} must hold an object with 'method' and 'options'")
    implementation(str(config.get("method")))  # a clear error for an unknown method
    _options(config, config_file)
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    try:
        tensors = load_file(weights)
    except (SafetensorError, OSError, ValueError) as err:
        raise ValueError(f"{weights} is not a readable safetensors file (truncated or corrupt?): {err}") from None
    if not tensors:
        raise ValueError(f"{weights} holds no tensors")
    return config, tensors


def _options(config: dict[str, Any], where: Path | str) -> MethodOptions:
    try:
        options = MethodOptions(**config.get("options", {}))
        options.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad options: {err}") from None
    return options


def _check_fit(model: nn.Module, tensors: dict[str, torch.Tensor], folder: Path | str) -> None:
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}" if missing else "",
                 f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}" if unexpected else ""]
        raise ValueError(f"{folder} does not fit this model: {'; '.join(p for p in parts if p)}")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(f"{folder} does not fit this model: {name} has shape {tuple(tensors[name].shape)} "
                             f"in the file and {tuple(param.shape)} in the model")


@torch.no_grad()
def _copy_in(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.copy_(tensors[name].to(param.dtype))


def load_method(model: nn.Module, path: str | os.PathLike) -> dict[str, Any]:
    """Apply the folder's method to `model` (a fresh base) and load its tensors. Returns the folder's config."""
    config, tensors = read_method(path)
    apply_method(model, config["method"], _options(config, path))
    try:
        _check_fit(model, tensors, path)
    except ValueError:
        remove_method(model)
        raise
    _copy_in(model, tensors)
    return config


def restore_method(model: nn.Module, path: str | os.PathLike) -> None:
    """Copy a folder's tensors into the same method already applied to `model` (resuming a run)."""
    config, tensors = read_method(path)
    state = method_state(model)
    options = _options(config, path)
    names = implementation(config["method"]).OPTIONS  # the file records the method's own options only
    if state is None or state.name != config["method"] or state.options.pick(names) != options.pick(names):
        raise ValueError(f"{path} holds {config['method']!r} with other options than the model's method")
    _check_fit(model, tensors, path)
    _copy_in(model, tensors)
