"""The training loop: AdamW on the trainable (adapter) parameters only, gradient accumulation, a
warm-up + linear-decay schedule, progress bar, metrics log, periodic evaluation, atomic checkpoints
and exact resume.

Determinism: the data order of epoch e is a permutation drawn from `seed + e`, and each checkpoint
stores the optimizer, scheduler and RNG states, so a run resumed from step k continues exactly as the
uninterrupted run would have (evaluation in between draws no random numbers).
"""

from __future__ import annotations

import json
import math
import os
import shutil
import time
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write
from ..io import load_adapter, save_adapter
from ..inject import adapter_names, delete_adapter
from ..methods import method_state, restore_method, save_method
from .data import IGNORE_INDEX
from .distributed import Parallel, load_optimizer_state, optimizer_state, unwrap
from .loss import causal_lm_loss
from .optim import param_groups
from .swiglu import fuse_gated_mlps, unfuse_gated_mlps

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"
METRICS_FILE = "metrics.jsonl"
GROUP_BATCHES = 50  # batches per length-sorted group (as transformers' group_by_length)


@dataclass
class LoopSettings:
    lr: float = 2e-4
    epochs: int = 1
    max_steps: int | None = None  # overrides epochs when set
    batch_size: int = 8
    grad_accum: int = 1
    warmup_ratio: float = 0.05
    weight_decay: float = 0.0
    loraplus_ratio: float | None = None  # LoRA+: B learns this many times faster than A (None: one rate)
    max_grad_norm: float | None = 1.0
    seed: int = 0
    log_every: int = 5
    eval_every: int | None = None  # steps between evaluations (None: only at the end)
    save_every: int | None = 50  # steps between checkpoints (None: none)
    keep_checkpoints: int = 2
    progress: bool = True
    tensorboard: bool = False  # also log scalars to <output>/tensorboard (needs the tensorboard package)
    group_by_length: bool = True  # micro-batches of similar lengths: less padding, same examples per epoch

    def total_steps(self, num_examples: int) -> int:
        steps_per_epoch = math.ceil(num_examples / (self.batch_size * self.grad_accum))
        return self.max_steps if self.max_steps is not None else steps_per_epoch * self.epochs


@dataclass
class TrainResult:
    steps: int
    final_loss: float | None
    wall_time_s: float
    tokens_per_s: float
    history: list[dict[str, Any]] = field(default_factory=list)


def _grouped_by_length(order: list[int], lengths: Sequence[int], batch_size: int,
                       generator: torch.Generator) -> list[int]:
    """`order` with each run of GROUP_BATCHES batches sorted by length, its batches then shuffled: batches of
    similar lengths (little padding) that still come in random order."""
    span = batch_size * GROUP_BATCHES
    out: list[int] = []
    for begin in range(0, len(order), span):
        group = sorted(order[begin : begin + span], key=lambda i: lengths[i], reverse=True)
        batches = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        out += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return out


def micro_batches(num_examples: int, settings: LoopSettings, start_step: int,
                  lengths: Sequence[int] | None = None) -> list[tuple[int, list[int]]]:
    """Every (optimizer step, example indices) micro-batch from `start_step` on, in the seeded order.

    Batches never cross an epoch boundary; the last batch of an epoch may be smaller. With `lengths`, each
    micro-batch holds examples of similar length (see `_grouped_by_length`).
    """
    total = settings.total_steps(num_examples)
    out: list[tuple[int, list[int]]] = []
    step, micro, epoch = 0, 0, 0
    while step < total:
        generator = torch.Generator().manual_seed(settings.seed + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
        if lengths is not None:
            order = _grouped_by_length(order, lengths, settings.batch_size, generator)
        for begin in range(0, num_examples, settings.batch_size):
            if step >= start_step:
                out.append((step, order[begin : begin + settings.batch_size]))
            micro += 1
            if micro % settings.grad_accum == 0:
                step += 1
                if step >= total:
                    break
        epoch += 1
    return out


def _optimizer(model: nn.Module, settings: LoopSettings, total_steps: int):
    groups = param_groups(model, settings.lr, settings.weight_decay, settings.loraplus_ratio)
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay)
    warmup = max(1, int(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    folder = Path(output_dir) / CHECKPOINT_DIR
    complete = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def _save_trained(model: nn.Module, folder: Path, adapter_name: str, adapter_meta: dict, write: bool) -> None:
    """The trained tensors: the method's file when a method of lorakit.methods is applied, else the LoRA adapter."""
    if method_state(model) is not None:
        save_method(model, folder, write=write, **adapter_meta)
    else:
        save_adapter(model, folder, adapter_name, write=write, **adapter_meta)


def _save_checkpoint(trained, optimizer, scheduler, step, rng_state, history, output_dir, adapter_name, keep,
                     adapter_meta, parallel: Parallel) -> Path:
    """Write `checkpoints/step-N` (adapter + optimizer, scheduler, RNG, history). Every rank must call it
    (FSDP shards are gathered); only rank 0 writes."""
    model = unwrap(trained)
    folder = Path(output_dir) / CHECKPOINT_DIR
    final = folder / f"step-{step:06d}"
    tmp = folder / f".tmp-step-{step:06d}"
    if parallel.is_main:
        folder.mkdir(parents=True, exist_ok=True)
        shutil.rmtree(tmp, ignore_errors=True)
    _save_trained(model, tmp, adapter_name, adapter_meta, parallel.is_main)
    state = {
        "step": step,
        "optimizer": optimizer_state(model, optimizer),
        "scheduler": scheduler.state_dict(),
        "torch_rng": rng_state,
        "history": history,
    }
    if parallel.is_main:
        torch.save(state, tmp / STATE_FILE)
        shutil.rmtree(final, ignore_errors=True)
        os.replace(tmp, final)  # a checkpoint folder is complete or absent
        older = sorted((p for p in folder.glob("step-*") if p != final), key=lambda p: p.name)
        for stale in older[: max(0, len(older) - (keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
    parallel.barrier()
    return final


def _tensorboard_writer(output: Path):
    try:
        from torch.utils.tensorboard import SummaryWriter
    except ImportError:
        raise ValueError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(output / "tensorboard"))


def loss_items(feature: dict) -> int:
    """How many terms the example adds to the loss: its target tokens after the causal shift, or 1."""
    labels = feature["labels"]
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX) if isinstance(labels, list) else 1


def _plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


def train_adapter(
    model: nn.Module,
    features: Sequence[dict[str, list[int]]],
    collate: Callable[[list[dict]], dict[str, torch.Tensor]],
    settings: LoopSettings,
    output_dir: str | os.PathLike,
    adapter_name: str = "default",
    evaluate: Callable[[nn.Module], dict[str, float]] | None = None,
    resume: bool = False,
    adapter_meta: dict[str, Any] | None = None,
    parallel: Parallel | None = None,
) -> TrainResult:
    """Train the model's trainable parameters on tokenized `features` (dicts of token lists).

    `evaluate(model) -> {"eval_loss": ..., ...}` runs every `eval_every` steps and at the end. With
    `resume`, the latest complete checkpoint in `output_dir/checkpoints` is restored first. Ctrl-C
    writes a checkpoint of the last finished step before stopping. With `parallel` (several processes)
    every micro-batch is split between the processes and only rank 0 writes files.
    """
    parallel = parallel or Parallel()
    output = Path(output_dir)
    if parallel.is_main:
        output.mkdir(parents=True, exist_ok=True)
    adapter_meta = adapter_meta or {}
    total = settings.total_steps(len(features))
    if total <= 0:
        raise ValueError("nothing to train: the data set is empty or max_steps is 0")

    start_step, history = 0, []
    checkpoint = latest_checkpoint(output) if resume else None
    if checkpoint is not None and method_state(model) is not None:
        restore_method(model, checkpoint)  # in place: the same parameters, the checkpoint's values
    elif checkpoint is not None:
        # Reload the adapter tensors of the checkpoint; the optimizer must be built on the new parameters.
        if adapter_name in adapter_names(model):
            delete_adapter(model, adapter_name)
        load_adapter(model, checkpoint, adapter_name)
    trained = parallel.wrap(model)
    optimizer, scheduler = _optimizer(model, settings, total)
    if checkpoint is not None:
        state = torch.load(checkpoint / STATE_FILE, weights_only=False)
        load_optimizer_state(model, optimizer, state["optimizer"])
        scheduler.load_state_dict(state["scheduler"])
        torch.set_rng_state(state["torch_rng"])
        start_step, history = state["step"], state["history"]
    metrics_log = output / METRICS_FILE
    if parallel.is_main:  # rewritten from the checkpoint's history so it never holds a lost future
        metrics_log.write_text("".join(json.dumps(h) + "\n" for h in history))

    lengths = [len(f["input_ids"]) for f in features] if settings.group_by_length else None
    plan = micro_batches(len(features), settings, start_step, lengths)
    # Each optimizer step minimises the mean over all loss terms (target tokens) of its examples, however
    # they are split into micro-batches and processes: each micro-batch's mean is weighted by its share.
    items = [loss_items(f) for f in features]
    step_items: dict[int, int] = {}
    for batch_step, indices in plan:
        step_items[batch_step] = step_items.get(batch_step, 0) + sum(items[i] for i in indices)

    model.train()
    step, window_loss, window_items, window_tokens, total_tokens = start_step, 0.0, 0, 0, 0
    begin = window_start = time.perf_counter()
    bar = tqdm(total=total, initial=start_step, disable=not (settings.progress and parallel.is_main), unit="step",
               dynamic_ncols=True)

    board = _tensorboard_writer(output) if settings.tensorboard and parallel.is_main else None

    def record(entry: dict[str, Any]) -> None:
        history.append(entry)
        if parallel.is_main:
            with metrics_log.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if board is not None:
            for key, value in entry.items():
                if key != "step":
                    board.add_scalar(key, value, entry["step"])

    # The RNG state at the start of the step after the last finished one: what a resume must restore,
    # also when Ctrl-C lands in the middle of a step whose dropout masks were already drawn.
    step_rng = torch.get_rng_state()

    def checkpoint_now() -> None:
        _save_checkpoint(trained, optimizer, scheduler, step, step_rng, history, output, adapter_name,
                         settings.keep_checkpoints, adapter_meta, parallel)

    fused_mlps = fuse_gated_mlps(model)  # a third less MLP activation memory; undone in `finally`
    try:
        for index, (batch_step, indices) in enumerate(plan):
            part, real = parallel.local_part(indices)
            batch = collate([features[i] for i in part])
            local_items = sum(items[i] for i in part) if real else 0
            loss = causal_lm_loss(trained, batch)
            # DDP and FSDP average gradients over processes; the factor `world` turns that into the sum.
            (loss * (local_items / max(step_items[batch_step], 1) * parallel.world)).backward()
            window_loss += loss.item() * local_items
            window_items += local_items
            window_tokens += int(batch["attention_mask"].sum()) if real else 0
            del loss, batch  # kept alive, they would hold memory through the next forward pass
            step_done = index + 1 == len(plan) or plan[index + 1][0] != batch_step
            if not step_done:
                continue
            if settings.max_grad_norm:
                torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]],
                                               settings.max_grad_norm)
            optimizer.step()
            scheduler.step()
            optimizer.zero_grad(set_to_none=True)
            step = batch_step + 1
            step_rng = torch.get_rng_state()
            bar.update(1)
            if step % settings.log_every == 0 or step == total:
                loss_sum, item_sum, token_sum = parallel.sum(window_loss, window_items, window_tokens)
                total_tokens += int(token_sum)
                now = time.perf_counter()
                entry = {
                    "step": step,
                    "loss": loss_sum / max(item_sum, 1),
                    "lr": scheduler.get_last_lr()[0],
                    "tokens_per_s": token_sum / max(now - window_start, 1e-9),
                }
                record(entry)
                bar.set_postfix(loss=f"{entry['loss']:.4f}", lr=f"{entry['lr']:.2e}", tok_s=f"{entry['tokens_per_s']:.0f}")
                window_loss, window_items, window_tokens, window_start = 0.0, 0, 0, now
            if evaluate and settings.eval_every and step % settings.eval_every == 0 and step != total:
                record({"step": step, **evaluate(model)})
                model.train()
            if settings.save_every and step % settings.save_every == 0 and step != total:
                checkpoint_now()
    except KeyboardInterrupt:
        optimizer.zero_grad(set_to_none=True)
        bar.close()
        # Other processes are being interrupted too, at other points: only a replicated model can be
        # saved without them (FSDP's shards would need every process).
        if parallel.mode != "fsdp" and parallel.is_main:
            _save_checkpoint(model, optimizer, scheduler, step, step_rng, history, output, adapter_name,
                             settings.keep_checkpoints, adapter_meta, Parallel())
        raise
    finally:
        unfuse_gated_mlps(fused_mlps)
    bar.close()
    wall = time.perf_counter() - begin
    if evaluate:
        record({"step": step, **evaluate(model)})
    checkpoint_now()
    _save_trained(model, output, adapter_name, adapter_meta, parallel.is_main)
    if parallel.is_main:
        _plot_losses(history, output / "loss.png")
    if board is not None:
        board.close()
    losses = [h["loss"] for h in history if "loss" in h]
    return TrainResult(step, losses[-1] if losses else None, wall, total_tokens / max(wall, 1e-9), history)


__all__ = ["LoopSettings", "TrainResult", "latest_checkpoint", "micro_batches", "train_adapter"]
