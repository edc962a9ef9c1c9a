"""`Estimate`: the figures of one estimated method, as `lorakit.estimate` returns them."""

from __future__ import annotations

import json
from dataclasses import asdict, dataclass, field
from typing import Any


@dataclass
class Estimate:
    """The plan for one method. Byte counts are exact for weights, gradients and optimizer state; the
    activation and peak figures come from the simulated training step."""

    model: str
    architecture: str
    task: str
    method: str
    dtype: str
    quantize: str | None
    optimizer: str
    batch_size: int
    max_length: int
    grad_checkpointing: bool
    checkpoint_blocks: int | None  # with grad_checkpointing: the first this many blocks (None: all)
    device: str
    target_modules: list[str] | str | None
    total_parameters: int  # the base model's (tied parameters once)
    trainable_parameters: int
    frozen_weight_bytes: int
    trainable_weight_bytes: int
    gradient_bytes: int
    optimizer_bytes: int
    activation_bytes: int | None  # the most activation memory alive at once during the step
    tensor_peak_bytes: int  # weights + the simulated step's peak of live tensors
    allocator_bytes: int  # CPU: allocator slack and runtime buffers beyond the tensors (0 on cuda)
    total_bytes: int  # expected peak memory of training: tensor peak + allocator slack
    adapter_file_bytes: int
    flops_per_step: int | None
    forward_flops: int | None
    flops_rule: int
    attention: str
    notes: list[str] = field(default_factory=list)

    @property
    def trainable_fraction(self) -> float:
        return self.trainable_parameters / self.total_parameters if self.total_parameters else 0.0

    @property
    def static_bytes(self) -> int:
        """Weights + gradients + optimizer state: the seeds' accounting, without activations."""
        return self.frozen_weight_bytes + self.trainable_weight_bytes + self.gradient_bytes + self.optimizer_bytes

    def seconds_per_step(self, tflops: float) -> float | None:
        """Time of one step at a sustained `tflops` (10¹² FLOP/s)."""
        return None if self.flops_per_step is None else self.flops_per_step / (tflops * 1e12)

    def to_dict(self) -> dict[str, Any]:
        data = asdict(self)
        data["trainable_fraction"] = self.trainable_fraction
        data["static_bytes"] = self.static_bytes
        return data

    def to_json(self) -> str:
        return json.dumps(self.to_dict(), indent=2)
