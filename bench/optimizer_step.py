"""The optimizer step of a LoRA run: PyTorch's AdamW with its per-tensor loop (the CPU default), `foreach` and
`fused` (what `lorakit train` takes where it applies, `lorakit.train.optim.fused_adamw_applies`), and gradient
clipping with and without `foreach`, on the trainable tensors of LoRA r=8 on SmolLM2-135M's q, k, v, o (240 tensors,
921,600 numbers) with random gradients. The set-ups take turns, one step each per round; the median is reported.

    .venv/bin/python bench/optimizer_step.py            # seconds; table + bench/results/optimizer_step.json
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch

from common import machine

RESULTS = Path(__file__).parent / "results" / "optimizer_step.json"
LAYERS, RANK = 30, 8
PROJECTIONS = [(576, 576), (576, 192), (576, 192), (576, 576)]  # (in, out) of q, k, v, o
ADAMW = {
    "adamw (per-tensor loop)": {"foreach": False},
    "adamw foreach": {"foreach": True},
    "adamw fused": {"fused": True},
}
CLIPPING = {"clip_grad_norm_": False, "clip_grad_norm_ foreach": True}


def lora_tensors() -> list[torch.nn.Parameter]:
    """A and B of every adapted projection, each with a random gradient."""
    generator = torch.Generator().manual_seed(0)
    shapes = [shape for _ in range(LAYERS) for i, o in PROJECTIONS for shape in ((RANK, i), (o, RANK))]
    params = [torch.nn.Parameter(torch.randn(shape, generator=generator)) for shape in shapes]
    for param in params:
        param.grad = torch.randn(param.shape, generator=generator)
    return params


def measure(rounds: int) -> dict[str, float]:
    """Median milliseconds per call of each set-up."""
    calls = {}
    for name, options in ADAMW.items():
        optimizer = torch.optim.AdamW(lora_tensors(), lr=1e-3, **options)
        calls[name] = optimizer.step
    for name, foreach in CLIPPING.items():
        params = lora_tensors()
        calls[name] = lambda params=params, foreach=foreach: torch.nn.utils.clip_grad_norm_(
            params, 1.0, foreach=foreach
        )
    times: dict[str, list[float]] = {name: [] for name in calls}
    for call in calls.values():
        call()  # warm-up (AdamW creates its state)
    for _ in range(rounds):
        for name, call in calls.items():
            began = time.perf_counter()
            call()
            times[name].append(time.perf_counter() - began)
    return {name: 1e3 * statistics.median(t) for name, t in times.items()}


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--rounds", type=int, default=50)
    args = parser.parse_args()
    results = {"machine": machine(), "rounds": args.rounds, "ms": measure(args.rounds)}
    results["load_after"] = machine()["load_average"]
    baseline = results["ms"]["adamw (per-tensor loop)"]
    print("| step | ms (median) | ×per-tensor AdamW |\n|---|---|---|")
    for name, ms in results["ms"].items():
        print(f"| {name} | {ms:.2f} | {ms / baseline:.2f} |")
    info = results["machine"]
    print(
        f"\n{info['cpu']}; cpu flags {' '.join(info['cpu_flags'])}; torch {info['torch']}, "
        f"{info['torch_threads']} threads"
    )
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
