"""A method's own files: a folder with `method_config.json` (the method, its options, and what the caller
adds: base model, task type) and `method_model.safetensors` (every trainable tensor under its parameter
name: the method's own, a classification head's, or all of them for full fine-tuning).

This module reads and writes such folders and checks tensors against a model; which method a folder
names is resolved by the registry. Writing puts config and weights in place as one unit
(`lorakit.atomic.write_files`); readers refuse damaged, oversized or hostile files and NaN / infinite
weights (`lorakit.safe_files`) and check everything before a caller changes the model.
"""

from __future__ import annotations

import json
import os
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from safetensors.torch import save_file
from torch import nn

from ..atomic import committed_files, write_files
from ..io import unsharded
from ..safe_files import FLOAT_DTYPES, parse_json, read_bounded, read_safetensors
from .base import MethodOptions

CONFIG_NAME = "method_config.json"
WEIGHTS_NAME = "method_model.safetensors"


def is_method_folder(path: str | os.PathLike) -> bool:
    return _files(Path(path))[CONFIG_NAME].is_file()


def method_tensors(model: nn.Module) -> dict[str, torch.Tensor]:
    """Every trainable tensor by parameter name, on the CPU (a collective under FSDP: every rank must call it)."""
    return {n: unsharded(p).detach().cpu().contiguous() for n, p in model.named_parameters() if p.requires_grad}


def write_folder(folder: str | os.PathLike, tensors: dict[str, torch.Tensor], config: dict[str, Any]) -> Path:
    """Write `config` and `tensors` to `folder` (created if needed) as one unit."""
    text = json.dumps(config, indent=2, sort_keys=True)  # before any file is written: it may fail
    return write_files(
        Path(folder),
        {
            WEIGHTS_NAME: lambda tmp: save_file(tensors, tmp, metadata={"format": "pt"}),
            CONFIG_NAME: lambda tmp: Path(tmp).write_text(text),
        },
    )


def read_config(path: str | os.PathLike) -> dict[str, Any]:
    """A method folder's config: a JSON object whose `options`, if any, is an object."""
    folder = Path(path)
    config_file = _files(folder)[CONFIG_NAME]
    if not folder.is_dir():
        raise FileNotFoundError(f"no method folder at {folder}")
    if not config_file.is_file():
        raise FileNotFoundError(f"{folder} has no {CONFIG_NAME}")
    config = parse_json(read_bounded(config_file), config_file)
    if not isinstance(config, dict) or not isinstance(config.get("options", {}), dict):
        raise ValueError(f"{config_file} must hold an object with 'method' and 'options'")
    return config


def read_folder(
    path: str | os.PathLike, check_method: Callable[[str], object]
) -> tuple[dict[str, Any], dict[str, torch.Tensor]]:
    """A method folder's config (validated) and tensors. `check_method(name)` raises ValueError for a
    method name the caller cannot load; it runs before the options and weights are read."""
    folder = Path(path)
    config = read_config(folder)
    check_method(str(config.get("method")))
    saved_options(config, folder / CONFIG_NAME)
    weights = _files(folder)[WEIGHTS_NAME]
    if not weights.is_file():
        raise FileNotFoundError(f"{folder} has no {WEIGHTS_NAME}")
    tensors, _ = read_safetensors(weights, weights, FLOAT_DTYPES)
    if not tensors:
        raise ValueError(f"{weights} holds no tensors")
    return config, tensors


def _files(folder: Path) -> dict[str, Path]:
    """Where the folder's files are (see `lorakit.atomic.committed_files`)."""
    return committed_files(folder, [WEIGHTS_NAME, CONFIG_NAME])


def saved_options(config: dict[str, Any], where: str | os.PathLike) -> MethodOptions:
    """The options a folder's config records, on top of the defaults, validated."""
    try:
        options = MethodOptions(**config.get("options", {}))
        options.validate()
    except (TypeError, ValueError) as err:
        raise ValueError(f"{where}: bad options: {err}") from None
    return options


def check_fit(model: nn.Module, tensors: dict[str, torch.Tensor], folder: str | os.PathLike) -> None:
    """The tensors are exactly the model's trainable parameters, shape for shape (else ValueError)."""
    expected = {n: p for n, p in model.named_parameters() if p.requires_grad}
    missing, unexpected = sorted(set(expected) - set(tensors)), sorted(set(tensors) - set(expected))
    if missing or unexpected:
        parts = [
            f"missing {', '.join(missing[:3])}{' …' if len(missing) > 3 else ''}" if missing else "",
            f"unexpected {', '.join(unexpected[:3])}{' …' if len(unexpected) > 3 else ''}" if unexpected else "",
        ]
        raise ValueError(f"{folder} does not fit this model: {'; '.join(p for p in parts if p)}")
    for name, param in expected.items():
        if tuple(tensors[name].shape) != tuple(param.shape):
            raise ValueError(
                f"{folder} does not fit this model: {name} has shape {tuple(tensors[name].shape)} "
                f"in the file and {tuple(param.shape)} in the model"
            )


@torch.no_grad()
def copy_in(model: nn.Module, tensors: dict[str, torch.Tensor]) -> None:
    """Copy the tensors into the model's trainable parameters of the same names (after `check_fit`)."""
    for name, param in model.named_parameters():
        if param.requires_grad:
            param.copy_(tensors[name].to(param.dtype))
