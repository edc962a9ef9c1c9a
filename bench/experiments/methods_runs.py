"""What the method comparisons (glue.py, e2e.py) share: fine-tuning a loaded model with one method and measuring
what it costs (with `lorakit train --method`'s own phases, without the scoring before training, periodic
checkpoints and prediction files a table does not need), mean ± std, the machine's description, and replacing
one marked section of docs/results.md."""

from __future__ import annotations

import json
import os
import platform
import statistics
import tempfile
import time
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

import lorakit
from lorakit.atomic import atomic_write
from lorakit.methods import MethodOptions, get_method
from lorakit.methods.measure import forward_latency_ms, weights_bytes
from lorakit.train.loop import LoopSettings
from lorakit.train.recipe import apply_tuning, measured_training, method_latency

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
DOCS = ROOT / "docs" / "results.md"


def load_average() -> list[float]:
    return [round(v, 2) for v in os.getloadavg()]


def cpu_name() -> str:
    for line in Path("/proc/cpuinfo").read_text().splitlines():
        if line.startswith("model name"):
            return line.split(":", 1)[1].strip()
    return platform.processor() or "?"


def fine_tune(
    model: nn.Module,
    method: str,
    features: Sequence[dict],
    collate: Callable,
    settings: LoopSettings,
    latency_batch: dict[str, torch.Tensor],
    lora: lorakit.LoraConfig,
    options: MethodOptions,
    evaluate: Callable[[nn.Module], dict[str, float]],
) -> dict[str, Any]:
    """Apply `method` (LoRA with `lora`, else lorakit.methods with `options`) to the loaded `model`, train it, score
    it with `evaluate` ("after"), and return that with the training figures and the costs: trainable parameters,
    the saved weights' size, the growth of resident memory while training, and the latency of a forward pass on
    `latency_batch` (before the method, with it, and merged where the method merges) — the training recipe's own
    phases (lorakit.train.recipe)."""
    latency = {"base": forward_latency_ms(model, latency_batch)}
    tuning = get_method(method)
    trainable, total = apply_tuning(model, tuning, replace(options, lora=lora), log=lambda message: None)
    with tempfile.TemporaryDirectory() as folder:
        result, memory = measured_training(model, features, collate, settings, folder)
        checkpoint_mb = weights_bytes(folder) / 2**20  # the method's weights as the training loop saved them
    after = evaluate(model)
    latency.update(method_latency(model, tuning, latency_batch))
    return {
        "after": after,
        "steps": result.steps,
        "final_loss": result.final_loss,
        "wall_time_s": result.wall_time_s,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "checkpoint_mb": checkpoint_mb,
        "rss_growth_mb": memory.peak_mb - memory.start_mb,
        "latency_ms": latency,
    }


def timed(work: Callable[[], dict[str, Any]]) -> dict[str, Any]:
    """`work()`'s result with the wall and CPU seconds it took."""
    started, cpu = time.perf_counter(), time.process_time()
    result = work()
    return {**result, "job_wall_s": time.perf_counter() - started, "job_cpu_s": time.process_time() - cpu}


def machine_line(meta: dict[str, Any]) -> str:
    """The results footer's sentence on the machine, its load and the run's time."""
    return (
        f"Machine: {meta['cpu']}, 2 cores shared with other engineers' jobs; torch {meta['torch']}, 1 thread. "
        f"Load average (1/5/15 min) before / after: {' '.join(map(str, meta['load_before']))} / "
        f"{' '.join(map(str, meta['load_after']))}; {meta['minutes']:.1f} min, {meta['cpu_minutes']:.1f} CPU-min."
    )


def mean_std(values: list[float], scale: float = 1.0, digits: int = 1) -> str:
    if not values:
        return "–"
    mean = statistics.mean(values) * scale
    if len(values) == 1:
        return f"{mean:.{digits}f}"
    return f"{mean:.{digits}f} ± {statistics.stdev(values) * scale:.{digits}f}"


def write_json(path: Path, data: Any) -> None:
    atomic_write(path, lambda tmp: Path(tmp).write_text(json.dumps(data, indent=2) + "\n"))


def update_docs_section(marker: str, text: str) -> None:
    """Put `text` between `<!-- marker -->` and `<!-- /marker -->` in docs/results.md (appended when absent),
    leaving every other section as it is."""
    start, end = f"<!-- {marker} -->", f"<!-- /{marker} -->"
    current = DOCS.read_text() if DOCS.is_file() else "# Results\n"
    block = f"{start}\n{text.rstrip()}\n{end}"
    if start in current and end in current:
        before, rest = current.split(start, 1)
        updated = before + block + rest.split(end, 1)[1]
    else:
        updated = current.rstrip() + "\n\n" + block + "\n"
    atomic_write(DOCS, lambda tmp: Path(tmp).write_text(updated))
