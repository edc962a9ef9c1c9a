"""How fast LoRA's dropout mask is drawn (`lorakit.layers.lora_function.keep_mask`) against PyTorch's Bernoulli
sampler, and what drawing the raw 64-bit words (no upper bound) saves over the bounded draw keep_mask used before.

One 512 × 576 mask (SmolLM2-135M's hidden width at batch 4 × 128), float32, the process keeping freed host memory
as lorakit's training loop does; the four cases take turns for 40 rounds of 20 calls each, medians reported.

    .venv/bin/python bench/dropout_mask.py     # seconds; table + bench/results/dropout_mask.json
"""

from __future__ import annotations

import json
import statistics
import time
from pathlib import Path

import torch

from lorakit.host_memory import keep_freed_host_memory
from lorakit.layers.lora_function import keep_mask

from common import machine, uptime

RESULTS = Path(__file__).parent / "results" / "dropout_mask.json"
SHAPE = (512, 576)
ROUNDS, CALLS = 40, 20


def cases() -> dict:
    words = torch.empty((SHAPE[0] * SHAPE[1] + 3) // 4, dtype=torch.int64)
    generator = torch.Generator().manual_seed(1)
    x = torch.empty(SHAPE)
    return {
        "words, bounded draw (before)": lambda: words.random_(-(2**63), 2**63 - 1, generator=generator),
        "words, raw 64-bit draw (keep_mask)": lambda: words.random_(-(2**63), None, generator=generator),
        "keep_mask (draw + compare)": lambda: keep_mask(3, x.shape, 0.05, x.device),
        "torch bernoulli_": lambda: torch.empty_like(x).bernoulli_(0.95),
    }


def main() -> None:
    keep_freed_host_memory()
    timed = cases()
    times: dict[str, list[float]] = {name: [] for name in timed}
    before = uptime()
    for _ in range(ROUNDS):
        for name, call in timed.items():
            begin = time.perf_counter()
            for _ in range(CALLS):
                call()
            times[name].append((time.perf_counter() - begin) / CALLS * 1e3)
    medians = {name: statistics.median(t) for name, t in times.items()}
    print(f"| {SHAPE[0]} × {SHAPE[1]} mask | median ms |\n|---|---:|")
    for name, ms in medians.items():
        print(f"| {name} | {ms:.3f} |")
    results = {
        "shape": SHAPE,
        "median_ms": medians,
        "machine": machine(),
        "uptime_before": before,
        "uptime_after": uptime(),
    }
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
