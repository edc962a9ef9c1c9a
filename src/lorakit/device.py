"""Where a job runs and in which precision: `--device auto|cpu|cuda|cuda:N|mps` and
`--precision auto|fp32|bf16|fp16`, resolved once here for every command.

Mixed precision follows the usual recipe: the frozen base is stored in the compute dtype, what trains is kept
in float32 (master weights), and the forward pass runs under `torch.autocast`; fp16 adds dynamic loss scaling
(`torch.amp.GradScaler`, see `lorakit.train.step`).
"""

from __future__ import annotations

import contextlib
import os
from collections.abc import Iterator, Mapping
from typing import Any

import torch
from torch import nn

DEVICES = ("auto", "cpu", "cuda", "cuda:N", "mps")
PRECISIONS = {"fp32": torch.float32, "bf16": torch.bfloat16, "fp16": torch.float16}
DEVICE_HELP = "where the model runs: auto (cuda, else mps, else cpu), cpu, cuda, cuda:N or mps"
PRECISION_HELP = (
    "compute dtype: fp32, bf16, fp16 (with loss scaling when training) or auto (bf16 on a GPU that has it, else fp32)"
)


def _mps_available() -> bool:
    backend = getattr(torch.backends, "mps", None)
    return bool(backend is not None and backend.is_available())


def resolve_device(spec: str | None = "auto") -> torch.device:
    """The device `spec` names, when this machine has it; else a one-line ValueError. Under torchrun
    (LOCAL_RANK set) a plain `cuda` (and `auto` on a CUDA host) is this process's GPU, `cuda:$LOCAL_RANK`."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        spec = "cuda" if torch.cuda.is_available() else "mps" if _mps_available() else "cpu"
    kind, _, index = spec.partition(":")
    if kind == "cpu" and not index:
        return torch.device("cpu")
    if kind == "mps" and not index:
        if not _mps_available():
            raise ValueError("--device mps: this machine has no MPS (Apple GPU) device")
        return torch.device("mps")
    if kind != "cuda" or (index and not index.isdigit()):
        raise ValueError(f"--device {spec}: expected one of {', '.join(DEVICES)}")
    count = torch.cuda.device_count() if torch.cuda.is_available() else 0
    if count == 0:
        raise ValueError(f"--device {spec}: no CUDA device is available on this machine")
    number = int(index) if index else int(os.environ.get("LOCAL_RANK", "0"))
    if number >= count:
        raise ValueError(f"--device {spec}: cuda:{number} does not exist; this machine has {count} CUDA device(s)")
    return torch.device("cuda", number)


def resolve_precision(spec: str | None, device: torch.device) -> torch.dtype:
    """The compute dtype `spec` names on `device`. `auto` is bf16 on a CUDA device that supports it and float32
    everywhere else: on a CPU without AVX512-BF16/AMX (as the machines this was measured on) bf16 is emulated
    and slower than float32, and fp16 autocast on the CPU is slower still; MPS bf16 support varies by OS."""
    spec = (spec or "auto").strip().lower()
    if spec == "auto":
        if device.type == "cuda" and torch.cuda.is_bf16_supported():
            return torch.bfloat16
        return torch.float32
    if spec not in PRECISIONS:
        raise ValueError(f"--precision {spec}: expected auto, {', '.join(PRECISIONS)}")
    return PRECISIONS[spec]


def precision_name(dtype: torch.dtype) -> str:
    return next(name for name, d in PRECISIONS.items() if d == dtype)


def autocast(device: torch.device | str, dtype: torch.dtype) -> contextlib.AbstractContextManager:
    """`torch.autocast` on `device` in `dtype`; nothing at all for float32 (fp32 runs are exactly as without it)."""
    if dtype == torch.float32:
        return contextlib.nullcontext()
    return torch.autocast(device_type=torch.device(device).type, dtype=dtype)


def model_device(model: nn.Module) -> torch.device:
    """Where the model's first parameter lives (cpu for a model without parameters)."""
    first = next(iter(model.parameters()), None)
    return first.device if first is not None else torch.device("cpu")


def to_device(batch: Mapping[str, Any], device: torch.device) -> dict[str, Any]:
    """The batch's tensors on `device` (non-blocking from pinned memory); other values as they are."""
    return {k: v.to(device, non_blocking=True) if isinstance(v, torch.Tensor) else v for k, v in batch.items()}


def trainable_to_float32(model: nn.Module) -> int:
    """Make every trainable floating-point parameter float32 (master weights over a half-precision base);
    returns how many were cast. A frozen parameter beside a trainable one in the same module (BitFit's norm
    weight beside its trained bias) becomes float32 too: layer_norm takes no weight and bias of two dtypes,
    and autocast casts them only for linear layers."""
    cast = 0
    for module in model.modules():
        own = [p for p in module.parameters(recurse=False) if p.is_floating_point()]
        mixed = any(p.requires_grad for p in own) and not isinstance(module, nn.Linear)
        for param in own:
            if (param.requires_grad or mixed) and param.dtype != torch.float32:
                param.data = param.data.float()
                cast += 1
    return cast


def place(model: nn.Module, device: torch.device, dtype: torch.dtype | None = None) -> nn.Module:
    """Move the model to `device` (and its floating-point weights to `dtype` when given); returns it."""
    return model.to(device=device, dtype=dtype) if dtype is not None else model.to(device)


def synchronize(device: torch.device) -> None:
    """Wait for the device's queued work (for timings); nothing on the CPU."""
    if device.type == "cuda":
        torch.cuda.synchronize(device)
    elif device.type == "mps":
        torch.mps.synchronize()


def peak_memory_mb(device: torch.device) -> float | None:
    """The device's peak allocated memory (MB) since its last reset, on CUDA; None elsewhere (RSS is the CPU's)."""
    if device.type != "cuda":
        return None
    return torch.cuda.max_memory_allocated(device) / 2**20


@contextlib.contextmanager
def tracking_peak(device: torch.device) -> Iterator[None]:
    """Reset the CUDA peak-memory counter on entry (so `peak_memory_mb` measures the block)."""
    if device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(device)
    yield
