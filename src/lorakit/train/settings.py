"""The training loop's settings (`LoopSettings`): learning rate and schedule, batch shape, how long to
train, and how often to log, evaluate and checkpoint. `lorakit.train.loop` re-exports it."""

from __future__ import annotations

import math
from dataclasses import dataclass, field

from .checkpointing import check_mode


@dataclass
class LoopSettings:
    lr: float = field(default=2e-4, metadata={"help": "peak learning rate"})
    epochs: int = field(default=1, metadata={"help": "passes over the training data"})
    max_steps: int | None = field(default=None, metadata={"help": "optimizer steps (overrides --epochs)"})
    batch_size: int = field(default=8, metadata={"help": "examples per micro-batch"})
    grad_accum: int = field(default=1, metadata={"help": "micro-batches per optimizer step"})
    warmup_ratio: float = field(default=0.05, metadata={"help": "fraction of steps with a rising learning rate"})
    weight_decay: float = field(default=0.0, metadata={"help": "AdamW weight decay"})
    loraplus_ratio: float | None = field(
        default=None, metadata={"help": "LoRA+: train B with lr × this ratio, e.g. 16 (none: one rate)"}
    )
    max_grad_norm: float | None = field(default=1.0, metadata={"help": "clip the gradient norm (none: no clipping)"})
    label_smoothing: float | None = field(
        default=None,
        metadata={
            "help": "label smoothing ε of the training loss: the target keeps 1 − ε, ε is spread over every class "
            "or token; not for regression (none: `lorakit train` takes 0.1 for causal-LM tasks, the LoRA paper's "
            "E2E setting, and 0 for the others; the library's loop takes 0)"
        },
    )
    seed: int = field(default=0, metadata={"help": "seed for initialisation, data order and dropout"})
    log_every: int = field(default=5, metadata={"help": "steps between metrics-log lines"})
    eval_every: int | None = field(
        default=None, metadata={"help": "steps between validation-loss evaluations (none: only at the end)"}
    )
    save_every: int | None = field(default=50, metadata={"help": "steps between checkpoints (none: no checkpoints)"})
    keep_checkpoints: int = field(default=2, metadata={"help": "checkpoints kept (older ones are deleted)"})
    progress: bool = field(default=True, metadata={"help": "progress bars"})
    tensorboard: bool = field(
        default=False, metadata={"help": "also log to <output>/tensorboard (needs the tensorboard package)"}
    )
    grad_checkpointing: str = field(
        default="auto",
        metadata={
            "help": "recompute activations in the backward pass: on, off, N (the first N blocks) or auto (the "
            "fewest blocks whose estimated step fits the memory limit)"
        },
    )
    memory_limit: float | None = field(
        default=None,
        metadata={
            "help": "GB the training step may use above the loaded weights, which decides how many blocks "
            "activation checkpointing's auto takes (none: 80 % of the memory free on the device)"
        },
    )
    group_by_length: bool = field(
        default=True,
        metadata={
            "help": "micro-batches of similar lengths (less padding, same examples per epoch); "
            "off: plain shuffled order"
        },
    )

    def __post_init__(self) -> None:
        check_mode(self.grad_checkpointing)
        if self.memory_limit is not None and not self.memory_limit > 0:
            raise ValueError(f"--memory-limit must be a positive number of GB, got {self.memory_limit}")
        if self.label_smoothing is not None and not 0.0 <= self.label_smoothing < 1.0:
            raise ValueError(f"label_smoothing must be in [0, 1), got {self.label_smoothing}")

    @property
    def memory_limit_bytes(self) -> int | None:
        return None if self.memory_limit is None else int(self.memory_limit * 1e9)

    def total_steps(self, num_examples: int) -> int:
        steps_per_epoch = math.ceil(num_examples / (self.batch_size * self.grad_accum))
        return self.max_steps if self.max_steps is not None else steps_per_epoch * self.epochs
