"""What every bench script shares: this process's memory as the kernel counts it, returning freed heap to the
system, the machine's description and load, one measurement run in a fresh child process, and the matrix-product
rate per dtype (the peak that model FLOPs utilisation is measured against).

Scripts in bench/ import it as `common` (their folder is on sys.path when run as `python bench/x.py`); the
scripts in bench/experiments/ put bench/ on sys.path first.
"""

from __future__ import annotations

import gc
import json
import os
import platform
import subprocess
import sys
import time
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from torch import nn

from lorakit.device import autocast, synchronize
from lorakit.methods.measure import release_free_memory

# glibc raises its mmap threshold as large blocks are freed and then keeps the freed heap; a fixed threshold of
# 128 KiB returns every large block to the system at once, so the RSS follows the live tensors.
MMAP_THRESHOLD_ENV = {"MALLOC_MMAP_THRESHOLD_": "131072"}
CPU_FLAGS = ("avx2", "avx512f", "avx512_bf16", "amx_bf16", "amx_tile")  # what decides the speed of bf16 and fp32
RESULT_PREFIX = "RESULT "  # marks a child's result line among whatever else it prints


# -- this process's memory ------------------------------------------------------------------------------------
def status_bytes(field: str) -> int:
    """A memory field of /proc/self/status (VmRSS, VmHWM, RssFile, ...) in bytes."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(field + ":"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"{field} not in /proc/self/status")


def status_mb(field: str) -> float:
    """`status_bytes(field)` in MiB."""
    return status_bytes(field) / 2**20


def release_and_reset_peak() -> None:
    """Collect garbage, return freed heap to the system, then restart the kernel's high-water mark VmHWM from the
    current RSS: a peak read afterwards belongs to what runs next, not to loading or to an earlier phase."""
    gc.collect()
    release_free_memory()
    Path("/proc/self/clear_refs").write_text("5")


def own_weights(model: nn.Module) -> None:
    """Copy every weight into anonymous memory: from_pretrained may leave them mapped from the safetensors file,
    where untouched pages count only once a step reads them (and stay resident after the tensors are freed)."""
    with torch.no_grad():
        for tensor in [*model.parameters(), *model.buffers()]:
            tensor.data = tensor.data.clone()


# -- the machine --------------------------------------------------------------------------------------------
def load_average() -> list[float]:
    """The 1, 5 and 15 minute load averages: the cores are shared, so every figure is recorded with its load."""
    return [round(value, 2) for value in os.getloadavg()]


def uptime() -> str:
    """`uptime`'s line (time, users, load averages), as the older results files record it."""
    return subprocess.run(["uptime"], capture_output=True, text=True).stdout.strip()


def _cpuinfo_value(key: str) -> str | None:
    cpuinfo = Path("/proc/cpuinfo")
    for line in cpuinfo.read_text().splitlines() if cpuinfo.is_file() else []:
        if line.startswith(key):
            return line.split(":", 1)[1].strip()
    return None


def cpu_name() -> str:
    return _cpuinfo_value("model name") or platform.processor() or "?"


def cpu_flags() -> list[str]:
    """Which of CPU_FLAGS the CPU has."""
    flags = set((_cpuinfo_value("flags") or "").split())
    return [flag for flag in CPU_FLAGS if flag in flags]


def machine() -> dict[str, Any]:
    """The machine a result was measured on: CPU, cores, flags, platform, torch and its threads, the load now."""
    return {
        "cpu": cpu_name(),
        "cpus": os.cpu_count(),
        "cpu_flags": cpu_flags(),
        "platform": platform.platform(),
        "torch": torch.__version__,
        "torch_threads": torch.get_num_threads(),
        "load_average": load_average(),
    }


def machine_line(meta: dict[str, Any]) -> str:
    """The results footer's sentence on the machine, its load and the run's time (meta: cpu, torch, load_before,
    load_after, minutes, cpu_minutes)."""
    return (
        f"Machine: {meta['cpu']}, 2 cores shared with other engineers' jobs; torch {meta['torch']}, 1 thread. "
        f"Load average (1/5/15 min) before / after: {' '.join(map(str, meta['load_before']))} / "
        f"{' '.join(map(str, meta['load_after']))}; {meta['minutes']:.1f} min, {meta['cpu_minutes']:.1f} CPU-min."
    )


# -- one measurement in a fresh process ---------------------------------------------------------------------
class ChildFailed(RuntimeError):
    """A child process exited with an error or reported no result; the message ends with its stderr."""


def report(result: dict[str, Any]) -> None:
    """In the child: hand `result` to the parent (one marked JSON line on stdout)."""
    print(RESULT_PREFIX + json.dumps(result), flush=True)


def run_child(script: str | Path, args: list[str], env: dict[str, str] | None = None) -> dict[str, Any]:
    """Run `python script *args` in a fresh process (its own memory peak, nothing left over from this one) with
    os.environ plus `env`, and return what it passed to `report`."""
    proc = subprocess.run(
        [sys.executable, str(script), *args], capture_output=True, text=True, env={**os.environ, **(env or {})}
    )
    results = [line for line in proc.stdout.splitlines() if line.startswith(RESULT_PREFIX)]
    if proc.returncode != 0 or not results:
        raise ChildFailed(
            f"{Path(script).name} {' '.join(args)} failed (exit {proc.returncode}):\n{proc.stderr[-3000:]}"
        )
    return json.loads(results[-1][len(RESULT_PREFIX) :])


# -- matrix products ------------------------------------------------------------------------------------------
GEMM_SHAPE = (512, 576, 1536)  # rows (4 × 128 tokens) × SmolLM2's hidden width × its MLP width


def gemm_rates(device: torch.device, repeats: int = 5) -> dict[str, float]:
    """GFLOP/s of an (m × k) @ (k × n) product per operand dtype, and under bf16 autocast over float32."""
    m, k, n = GEMM_SHAPE
    a, b = torch.randn(m, k, device=device), torch.randn(k, n, device=device)
    cases: dict[str, Callable[[], torch.Tensor]] = {}
    for name, dtype in (("fp32", torch.float32), ("bf16", torch.bfloat16), ("fp16", torch.float16)):
        x, y = a.to(dtype), b.to(dtype)
        cases[name] = lambda x=x, y=y: x @ y

    def autocast_product() -> torch.Tensor:
        with autocast(device, torch.bfloat16):
            return a @ b

    cases["bf16 autocast"] = autocast_product
    rates = {}
    for name, product in cases.items():
        product()  # warm-up: kernel selection, first-touch of the output
        synchronize(device)
        began = time.perf_counter()
        for _ in range(repeats):
            product()
        synchronize(device)
        rates[name] = 2 * m * k * n * repeats / (time.perf_counter() - began) / 1e9
    return rates
