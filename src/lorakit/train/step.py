"""One optimizer step: forward and backward over the step's micro-batches (each process its share),
gradient clipping, then the AdamW and schedule update; and the loss and token counts since the last log.

Each optimizer step minimises the mean over all loss terms (target tokens) of its examples, however they
are split into micro-batches and processes: each micro-batch's mean loss is weighted by its share.

Every batch is moved to the model's device and the forward pass runs under autocast in the compute dtype
(nothing changes in float32). In fp16 a `torch.amp.GradScaler` scales the loss; a step whose gradients hold
inf/nan is skipped and counted (`skipped_steps` in the metrics log). The loss stays on the device until a
log step reads it, so no micro-batch waits for the device.
"""

from __future__ import annotations

import time
import warnings
from collections.abc import Callable, Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from torch import nn

from ..device import autocast, to_device
from .distributed import Parallel, training_loss
from .examples import IGNORE_INDEX
from .optim import fused_adamw_applies, param_groups
from .settings import LoopSettings


def build_optimizer(
    model: nn.Module, settings: LoopSettings, total_steps: int
) -> tuple[torch.optim.Optimizer, torch.optim.lr_scheduler.LambdaLR]:
    """AdamW on the trainable parameters (fused where it applies), and a linear warm-up then linear decay to 0 at
    `total_steps`."""
    groups = param_groups(model, settings.lr, settings.weight_decay, settings.loraplus_ratio)
    fused = fused_adamw_applies(p for group in groups for p in group["params"]) or None
    optimizer = torch.optim.AdamW(groups, lr=settings.lr, weight_decay=settings.weight_decay, fused=fused)
    warmup = max(1, int(settings.warmup_ratio * total_steps)) if settings.warmup_ratio > 0 else 0

    def factor(step: int) -> float:
        if step < warmup:
            return (step + 1) / warmup
        return max(0.0, (total_steps - step) / max(1, total_steps - warmup))

    return optimizer, torch.optim.lr_scheduler.LambdaLR(optimizer, factor)


def loss_items(feature: dict) -> int:
    """How many terms the example adds to the loss: its target tokens after the causal shift, or 1."""
    labels = feature["labels"]
    return sum(1 for label in labels[1:] if label != IGNORE_INDEX) if isinstance(labels, list) else 1


@dataclass
class LossWindow:
    """Loss, loss terms and tokens of this process since the last logged step."""

    loss: float | torch.Tensor = 0.0  # sum of micro-batch mean losses, each times its loss terms (float64)
    items: int = 0
    tokens: int = 0
    start: float = field(default_factory=time.perf_counter)
    total_tokens: int = 0  # tokens of every process in the windows closed so far
    skipped: int | None = None  # fp16 steps skipped for inf/nan gradients (None: no loss scaling)

    def close(self, step: int, lr: float, parallel: Parallel) -> dict[str, Any]:
        """The metrics entry of the window (summed over processes); a new window starts."""
        loss_sum, item_sum, token_sum = parallel.sum(float(self.loss), self.items, self.tokens)
        self.total_tokens += int(token_sum)
        now = time.perf_counter()
        entry = {
            "step": step,
            "loss": loss_sum / max(item_sum, 1),
            "lr": lr,
            "tokens_per_s": token_sum / max(now - self.start, 1e-9),
        }
        if self.skipped is not None:
            entry["skipped_steps"], self.skipped = self.skipped, 0
        self.loss, self.items, self.tokens, self.start = 0.0, 0, 0, now
        return entry


@dataclass
class Stepper:
    """Runs optimizer steps over `features` and counts what they process in `window`."""

    trained: nn.Module  # what forward/backward run on (DDP/FSDP-wrapped under several processes)
    features: Sequence[dict[str, Any]]
    collate: Callable[[list[dict]], dict[str, torch.Tensor]]
    parallel: Parallel
    max_grad_norm: float | None
    window: LossWindow = field(default_factory=LossWindow)
    device: torch.device = field(default_factory=lambda: torch.device("cpu"))  # the model's
    dtype: torch.dtype = torch.float32  # the compute dtype of autocast
    scaler: torch.amp.GradScaler | None = None  # fp16's dynamic loss scaling
    label_smoothing: float = 0.0  # of the training loss (`train.loss`)

    def __post_init__(self) -> None:
        if self.scaler is not None and self.window.skipped is None:
            self.window.skipped = 0

    def step(
        self,
        batches: list[list[int]],
        optimizer: torch.optim.Optimizer,
        scheduler: torch.optim.lr_scheduler.LRScheduler,
    ) -> None:
        """One optimizer step over `batches`, the example indices of each of its micro-batches."""
        step_items = sum(loss_items(self.features[i]) for indices in batches for i in indices)
        for number, indices in enumerate(batches):
            with self.parallel.gradient_sync(self.trained, sync=number == len(batches) - 1):
                self._backward(indices, step_items)
        if self.scaler is not None:
            self.scaler.unscale_(optimizer)  # clipping sees the true gradients
        if self.max_grad_norm:
            torch.nn.utils.clip_grad_norm_([p for g in optimizer.param_groups for p in g["params"]], self.max_grad_norm)
        if self.scaler is None:
            optimizer.step()
        else:
            scale = self.scaler.get_scale()
            self.scaler.step(optimizer)  # skipped when a gradient is inf/nan
            self.scaler.update()  # ... and then the scale shrinks
            if self.scaler.get_scale() < scale and self.window.skipped is not None:
                self.window.skipped += 1
        with warnings.catch_warnings():  # a skipped first step: the schedule still counts it, on purpose
            warnings.filterwarnings("ignore", "Detected call of `lr_scheduler.step", UserWarning)
            scheduler.step()
        optimizer.zero_grad(set_to_none=True)

    def _backward(self, indices: list[int], step_items: int) -> None:
        # Loss and batch are locals so that they are freed before the next forward pass.
        part, real = self.parallel.local_part(indices)
        batch = self.collate([self.features[i] for i in part])
        local_items = sum(loss_items(self.features[i]) for i in part) if real else 0
        tokens = int(batch["attention_mask"].sum()) if real else 0  # counted on the host, before the copy
        batch = to_device(batch, self.device)
        with autocast(self.device, self.dtype):
            loss = training_loss(self.trained, batch, self.label_smoothing)
        # DDP and FSDP average gradients over processes; the factor `world` turns that into the sum.
        scaled = loss * (local_items / max(step_items, 1) * self.parallel.world)
        (scaled if self.scaler is None else self.scaler.scale(scaled)).backward()
        # In float64 on the device: the same sum as Python floats of `loss.item()`, read only at log steps.
        self.window.loss = self.window.loss + loss.detach().double() * local_items
        self.window.items += local_items
        self.window.tokens += tokens
