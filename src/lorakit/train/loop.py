"""The training loop: AdamW on the trainable (adapter) parameters only, gradient accumulation, a
warm-up + linear-decay schedule, progress bar, metrics log, periodic evaluation, atomic checkpoints
and exact resume.

Determinism: the data order of epoch e is a permutation drawn from `seed + e`, and each checkpoint
stores the optimizer, scheduler and RNG states, so a run resumed from step k continues exactly as the
uninterrupted run would have (evaluation in between draws no random numbers). Under several processes each
rank reseeds its RNG at every step from (seed, step, rank) instead (`Parallel.seed_step`).

The parts live in their own modules: the settings (`settings`), the micro-batch order (`batches`), one
optimizer step (`step`), checkpoints (`checkpoint`) and the metrics log (`metrics_log`); this module
puts them together and re-exports the names callers use.
"""

from __future__ import annotations

import dataclasses
import os
import time
from collections.abc import Callable, Iterator, Sequence
from contextlib import contextmanager
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..device import model_device
from ..host_memory import keep_freed_host_memory
from .batches import by_step, feature_batches, micro_batches
from .checkpoint import CHECKPOINT_DIR, STATE_FILE, Checkpointer, TrainingState, cuda_rng_state, latest_checkpoint
from .checkpointing import (
    StepPlan,
    blocks_to_checkpoint,
    checkpointable_blocks,
    disable_checkpointing,
    enable_checkpointing,
    memory_budget,
)
from .distributed import Parallel
from .fast_paths import training_fast_paths
from .metrics_log import METRICS_FILE, MetricsLog
from .settings import LoopSettings
from .step import Stepper, build_optimizer, loss_items

Evaluate = Callable[[nn.Module], dict[str, float]]


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    wall_time_s: float  # training time of all `steps`, summed over the parts of a resumed run
    tokens_per_s: float  # of this process's part (the whole run unless it was resumed)
    history: list[dict[str, Any]] = field(default_factory=list)
    checkpointed_blocks: int = 0  # transformer blocks that recomputed their activations in the backward pass


@dataclass
class _Run:
    """One training run under way: its parts and where it stands."""

    model: nn.Module
    settings: LoopSettings
    total: int  # optimizer steps of the whole run
    state: TrainingState
    stepper: Stepper
    checkpointer: Checkpointer
    log: MetricsLog
    evaluate: Evaluate | None
    bar: tqdm
    started: float = field(default_factory=time.perf_counter)  # when this part of the run began training
    seconds_before: float = 0.0  # training time of the parts before it (a resumed run's checkpoint has it)


def _start(
    model: nn.Module,
    settings: LoopSettings,
    total: int,
    checkpointer: Checkpointer,
    resume: bool,
    precision: torch.dtype = torch.float32,
) -> tuple[nn.Module, TrainingState]:
    """The module to train (wrapped for the processes) and the optimizer state, both restored from the
    latest checkpoint when resuming. fp16 gets a GradScaler, whose state the checkpoint holds too."""
    folder = latest_checkpoint(checkpointer.output) if resume else None
    if folder is not None:
        checkpointer.restore_trained(model, folder)
    trained = checkpointer.parallel.wrap(model, precision)
    state = TrainingState(*build_optimizer(model, settings, total))
    if precision == torch.float16:
        state.scaler = torch.amp.GradScaler(model_device(model).type)
    if folder is not None:
        checkpointer.restore_state(folder, model, state)
    return trained, state


@contextmanager
def _fast_paths(model: nn.Module, checkpointed_blocks: int, sharded: bool) -> Iterator[None]:
    """The step's fast paths (`training_fast_paths`) while training and activation checkpointing of the first
    `checkpointed_blocks` blocks; all undone afterwards."""
    with training_fast_paths(model, sharded):
        if checkpointed_blocks:
            enable_checkpointing(model, checkpointed_blocks)
        try:
            yield
        finally:
            if checkpointed_blocks:
                disable_checkpointing(model)


def _progress_bar(total: int, done: int, show: bool) -> tqdm:
    return tqdm(total=total, initial=done, disable=not show, unit="step", dynamic_ncols=True)


def _record_evaluation(run: _Run, evaluate: Evaluate) -> None:
    run.log.record({"step": run.state.step, **evaluate(run.model)})


def _after_step(run: _Run) -> None:
    """Log, evaluate and checkpoint as the settings ask (the end of the run does each once more)."""
    step, settings, last = run.state.step, run.settings, run.state.step == run.total
    if step % settings.log_every == 0 or last:
        entry = run.stepper.window.close(step, float(run.state.scheduler.get_last_lr()[0]), run.checkpointer.parallel)
        run.log.record(entry)
        run.bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
    if run.evaluate and settings.eval_every and step % settings.eval_every == 0 and not last:
        _record_evaluation(run, run.evaluate)
        run.model.train()
    if settings.save_every and step % settings.save_every == 0 and not last:
        run.checkpointer.save(run.stepper.trained, run.state)


def _train_steps(run: _Run) -> None:
    """Every remaining optimizer step. On Ctrl-C, checkpoint the last finished step before stopping."""
    plan = feature_batches(run.stepper.features, run.settings, run.state.step)
    try:
        for step, batches in by_step(plan):
            run.checkpointer.parallel.seed_step(run.settings.seed, step)
            run.stepper.step(batches, run.state.optimizer, run.state.scheduler)
            run.state.step, run.state.rng_state = step + 1, torch.get_rng_state()
            run.state.cuda_rng = cuda_rng_state(run.stepper.device)
            run.state.seconds = run.seconds_before + time.perf_counter() - run.started
            run.bar.update(1)
            _after_step(run)
    except KeyboardInterrupt:
        run.state.optimizer.zero_grad(set_to_none=True)
        run.bar.close()
        run.checkpointer.save_interrupted(run.model, run.state)
        raise


def _finish(run: _Run) -> TrainResult:
    """Final evaluation, checkpoint and trained tensors in the output folder, the loss curve."""
    wall = time.perf_counter() - run.started  # this part's training, before the final evaluation and saves
    run.state.seconds = run.seconds_before + wall
    if run.evaluate:
        _record_evaluation(run, run.evaluate)
    run.checkpointer.save(run.stepper.trained, run.state)
    run.checkpointer.save_trained(run.model, run.checkpointer.output)
    run.log.close()
    tokens_per_s = run.stepper.window.total_tokens / max(wall, 1e-9)
    return TrainResult(run.state.step, run.log.last_loss(), run.state.seconds, tokens_per_s, run.state.history)


def _stepper(
    trained: nn.Module,
    features: Sequence[dict[str, list[int]]],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    settings: LoopSettings,
    parallel: Parallel,
    device: torch.device,
    precision: torch.dtype,
    scaler: torch.amp.GradScaler | None,
) -> Stepper:
    """The run's optimizer step: its micro-batches, gradient clipping, autocast and loss (label smoothing)."""
    return Stepper(
        trained,
        features,
        collate,
        parallel,
        settings.max_grad_norm,
        device=device,
        dtype=precision,
        scaler=scaler,
        label_smoothing=settings.label_smoothing or 0.0,
    )


def checkpointed_blocks(
    model: nn.Module, mode: str, step_plan: StepPlan | None, budget: int | None, parallel: Parallel | None = None
) -> int:
    """How many of `model`'s blocks, from the first, a run checkpoints with `--grad-checkpointing mode`
    (`train.checkpointing`). "auto" is decided against `step_plan` and `budget` (`memory_budget`), and under
    several processes it is the most any process needs: FSDP's collectives must match, and the free memory
    differs between processes."""
    blocks = blocks_to_checkpoint(mode, len(checkpointable_blocks(model)), step_plan, budget)
    if mode == "auto" and parallel is not None:
        blocks = max(parallel.gather([blocks]))
    return blocks


def train_adapter(
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    settings: LoopSettings,
    output_dir: str | os.PathLike,
    adapter_name: str = "default",
    evaluate: Evaluate | None = None,
    resume: bool = False,
    adapter_meta: dict[str, Any] | None = None,
    parallel: Parallel | None = None,
    precision: torch.dtype = torch.float32,
    step_plan: StepPlan | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on tokenized `features` (dicts of token lists).

    `evaluate(model) -> {"eval_loss": ..., ...}` runs every `eval_every` steps and at the end. With
    `resume`, the latest complete checkpoint in `output_dir/checkpoints` is restored first. Ctrl-C
    writes a checkpoint of the last finished step before stopping. With `parallel` (several processes)
    every micro-batch is split between the processes and only rank 0 writes files. Batches go to the model's
    device; `precision` is the compute dtype of the forward pass (autocast; fp16 with loss scaling). Checkpointing
    "auto" takes the fewest blocks for which `step_plan` (the step's memory above the weights with k blocks
    checkpointed, from `lorakit.estimate`) fits the memory budget, and under several processes the most any
    of them needs (`checkpointed_blocks`); without a plan it is off."""
    parallel = parallel or Parallel()
    output = Path(output_dir)
    if parallel.is_main:
        output.mkdir(parents=True, exist_ok=True)
    total = settings.total_steps(len(features))
    if total <= 0:
        raise ValueError("nothing to train: the data set is empty or max_steps is 0")
    checkpointer = Checkpointer(output, adapter_name, adapter_meta or {}, settings.keep_checkpoints, parallel)
    trained, state = _start(model, settings, total, checkpointer, resume, precision)
    device = model_device(model)
    if device.type == "cpu":
        keep_freed_host_memory()  # the steps reuse freed activations instead of faulting in fresh pages
    run = _Run(
        model=model,
        settings=settings,
        total=total,
        state=state,
        stepper=_stepper(trained, features, collate, settings, parallel, device, precision, state.scaler),
        checkpointer=checkpointer,
        log=MetricsLog(output, state.history, write=parallel.is_main, tensorboard=settings.tensorboard),
        evaluate=evaluate,
        bar=_progress_bar(total, state.step, show=settings.progress and parallel.is_main),
    )
    model.train()
    run.started = run.stepper.window.start = time.perf_counter()
    run.seconds_before = state.seconds
    budget = memory_budget(settings.memory_limit_bytes, device)
    blocks = checkpointed_blocks(model, settings.grad_checkpointing, step_plan, budget, parallel)
    with _fast_paths(model, blocks, sharded=parallel.mode == "fsdp"):
        _train_steps(run)
    run.bar.close()
    return dataclasses.replace(_finish(run), checkpointed_blocks=blocks)


__all__ = [
    "CHECKPOINT_DIR",
    "METRICS_FILE",
    "STATE_FILE",
    "LoopSettings",
    "TrainResult",
    "checkpointed_blocks",
    "latest_checkpoint",
    "loss_items",
    "micro_batches",
    "train_adapter",
]
