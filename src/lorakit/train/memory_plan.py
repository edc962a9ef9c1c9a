"""The memory a training run plans for: `lorakit estimate`'s figure for the run's step with k blocks
checkpointed, from which `--grad-checkpointing auto` takes how many (`train.checkpointing.blocks_to_checkpoint`)."""

from __future__ import annotations

import functools
from typing import Any

from torch import nn

from ..estimation import estimate
from ..estimation.report import human_bytes
from .checkpointing import StepPlan


def planned_step_bytes(model: nn.Module, method: str, options: dict[str, Any], precision: str) -> int | None:
    """`lorakit estimate`'s figure for a training step of `model` (its config: nothing is run) with `method` and
    the estimate options of the run (r, alpha, dropout, target_modules, quantize, batch_size, max_length, ...):
    the peak above the weights. None when the estimate cannot be made (an architecture it cannot build)."""
    config = getattr(model, "config", None)
    if config is None:
        return None
    device = "cuda" if next(model.parameters()).device.type == "cuda" else "cpu"
    try:
        est = estimate(config, method, dtype=precision, device=device, **options)
    except ValueError:
        return None
    if est.activation_bytes is None:  # the step could not be simulated: no activation figure to plan with
        return None
    return est.total_bytes - est.frozen_weight_bytes - est.trainable_weight_bytes


def step_plan(model: nn.Module, method: str, options: dict[str, Any], precision: str) -> StepPlan:
    """`planned_step_bytes` with the first k blocks checkpointed, as a function of k (each k estimated once)."""

    @functools.cache
    def plan(blocks: int) -> int | None:
        checkpointing = {"grad_checkpointing": blocks > 0, "checkpoint_blocks": blocks}
        return planned_step_bytes(model, method, {**options, **checkpointing}, precision)

    return plan


def plan_text(plan: StepPlan, blocks: int, budget: int | None) -> str:
    """Why `blocks` blocks: the planned step without and with them, against the budget."""
    without, checkpointed, limit = (human_bytes(n) for n in (plan(0), plan(blocks), budget))
    return (
        f"the step is estimated at {without} above the weights without it, {checkpointed} with; the budget is {limit}"
    )
