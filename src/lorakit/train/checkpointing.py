"""Activation checkpointing of a training run: which transformer blocks recompute their activations in the
backward pass, and switching it on and off.

A checkpointed block keeps only its input for the backward pass and runs its forward again there: its
activation memory drops to that input, for one more forward pass of the block (about a third more
arithmetic). PyTorch restores the RNG state before the recomputation, so dropout masks — LoRA's fused product
draws its seed from the global generator — are the ones the first forward drew, and gradients equal those
without checkpointing.

Blocks are checkpointed from the first on: memory and recomputation both grow by one block's worth per block,
and the backward pass reaches the first blocks last, when the later blocks' saved tensors are already freed,
so their recomputation does not add to the peak at the start of the backward pass.

`--grad-checkpointing` takes `on` (every block), `off`, a number of blocks, or `auto` (lorakit train's
default): the fewest blocks for which `lorakit estimate`'s figure for the run's step fits the budget — the
peak above the loaded weights at most `--memory-limit`, or without one `HEADROOM` of the memory free on the
device (MemAvailable on the CPU, `torch.cuda.mem_get_info` on CUDA).
"""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

import torch
from torch import nn
from transformers.modeling_layers import GradientCheckpointingLayer

from ..methods.base import text_config

MODES = ("auto", "on", "off")  # or a number of blocks
HEADROOM = 0.8  # of the free memory a step may plan to use before checkpointing turns on

StepPlan = Callable[[int], "int | None"]
"""The planned memory of a training step above the loaded weights with its first k blocks checkpointed (None
when it cannot be estimated)."""


def check_mode(mode: str) -> None:
    """Refuse a `--grad-checkpointing` value that is neither a mode nor a number of blocks."""
    if mode not in MODES and not (mode.isdigit() and int(mode) >= 0):
        raise ValueError(f"--grad-checkpointing {mode}: expected one of {', '.join(MODES)} or a number of blocks")


def checkpointable_blocks(model: nn.Module) -> list[GradientCheckpointingLayer]:
    """The model's transformer blocks that transformers can checkpoint, in the order they run."""
    return [module for module in model.modules() if isinstance(module, GradientCheckpointingLayer)]


def enable_checkpointing(model: nn.Module, blocks: int | None = None) -> None:
    """Recompute the first `blocks` transformer blocks of a transformers model in the backward pass (None: every
    block); non-reentrant checkpointing, so no input needs requires_grad. The KV cache is off, as transformers
    itself would switch it off."""
    if not getattr(model, "supports_gradient_checkpointing", False):
        raise ValueError(f"{type(model).__name__} does not support activation checkpointing")
    enable = getattr(model, "activation_checkpointing_enable", None)  # transformers ≥ 5's name
    if enable is not None:
        enable(activation_checkpointing_kwargs={"use_reentrant": False})
    else:
        model.gradient_checkpointing_enable(gradient_checkpointing_kwargs={"use_reentrant": False})  # type: ignore[operator]
    if blocks is not None:
        every_block = checkpointable_blocks(model)
        if not 0 <= blocks <= len(every_block):
            disable_checkpointing(model)
            raise ValueError(f"cannot checkpoint {blocks} blocks: the model has {len(every_block)}")
        for block in every_block[blocks:]:
            block.gradient_checkpointing = False
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


def memory_budget(limit_bytes: int | None, device: torch.device) -> int | None:
    """What a step may use above the loaded weights: `limit_bytes` when given, else HEADROOM of the memory free
    on `device` (None where that cannot be read)."""
    if limit_bytes is not None:
        return limit_bytes
    free = free_memory_bytes(device)
    return None if free is None else int(HEADROOM * free)


def blocks_to_checkpoint(mode: str, total: int, plan: StepPlan | None, budget: int | None) -> int:
    """How many of the model's `total` blocks to checkpoint, from the first: `on` all, `off` none, a number
    that many; `auto` the fewest for which `plan` fits `budget` (none when the step fits without, or when
    either is unknown; all when even that does not fit). `plan` is taken to shrink as blocks are added, so
    the search asks it for about log2(total) + 2 counts."""
    check_mode(mode)
    if mode != "auto":
        blocks = total if mode == "on" else 0 if mode == "off" else int(mode)
        if blocks > total:
            raise ValueError(f"--grad-checkpointing {mode}: the model has {total} blocks")
        return blocks
    if plan is None or budget is None or _fits(plan(0), budget) or total == 0:
        return 0
    if not _fits(plan(total), budget):
        return total
    over, fits = 0, total  # plan(over) > budget >= plan(fits)
    while fits - over > 1:
        middle = (over + fits) // 2
        over, fits = (over, middle) if _fits(plan(middle), budget) else (middle, fits)
    return fits


def _fits(planned: int | None, budget: int) -> bool:
    return planned is None or planned <= budget
