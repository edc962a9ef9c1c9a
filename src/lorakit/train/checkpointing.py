"""Activation checkpointing of a training run: whether to recompute each transformer block's activations in
the backward pass, and switching it on and off.

With it, a block keeps only its input for the backward pass and runs its forward again there: activation
memory drops from every block's saved tensors to the block inputs plus one block's worth (about 1/layers of
it), for one more forward pass (about a third more arithmetic). PyTorch restores the RNG state before the
recomputation, so dropout masks — LoRA's fused product draws its seed from the global generator — are the
ones the first forward drew, and gradients equal those without checkpointing.

`--grad-checkpointing auto` (lorakit train's default) turns it on only when `lorakit estimate`'s figure for
the run's step would not fit: its peak above the loaded weights exceeds `HEADROOM` of the memory free on
the device (MemAvailable on the CPU, `torch.cuda.mem_get_info` on CUDA).
"""

from __future__ import annotations

from pathlib import Path

import torch
from torch import nn

from ..methods.base import text_config

MODES = ("auto", "on", "off")
HEADROOM = 0.8  # of the free memory a step may plan to use before checkpointing turns on


def enable_checkpointing(model: nn.Module) -> None:
    """Recompute every block of a transformers model in the backward pass (non-reentrant checkpointing, so no
    input needs requires_grad); the KV cache is off, as transformers itself would switch it off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    for config in _configs(model):
        config.use_cache = False


def disable_checkpointing(model: nn.Module) -> None:
    """Undo `enable_checkpointing` (generation after training wants its cache back)."""
    disable = getattr(model, "activation_checkpointing_disable", None) or getattr(
        model, "gradient_checkpointing_disable", None
    )
    if disable is not None:
        disable()
    for config in _configs(model):
        config.use_cache = True


def _configs(model: nn.Module) -> list:
    """The model's config and its text part's, each once (they are one object for a text-only model)."""
    if getattr(model, "config", None) is None:
        return []
    return list({id(c): c for c in (model.config, text_config(model))}.values())


def free_memory_bytes(device: torch.device) -> int | None:
    """Memory the process can still use on `device`, or None where it cannot be read."""
    if device.type == "cuda":
        return torch.cuda.mem_get_info(device)[0]
    meminfo = Path("/proc/meminfo")
    if device.type != "cpu" or not meminfo.exists():
        return None
    for line in meminfo.read_text().splitlines():
        if line.startswith("MemAvailable:"):
            return int(line.split()[1]) * 1024
    return None


def wanted(mode: str, step_bytes: int | None, free_bytes: int | None) -> bool:
    """Whether to checkpoint: `on`/`off` as said; `auto` when the step's planned bytes above the loaded weights
    exceed HEADROOM of the free memory (never when either figure is unknown)."""
    if mode not in MODES:
        raise ValueError(f"--grad-checkpointing {mode}: expected one of {', '.join(MODES)}")
    if mode != "auto":
        return mode == "on"
    return step_bytes is not None and free_bytes is not None and step_bytes > HEADROOM * free_bytes
