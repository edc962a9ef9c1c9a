"""lorakit's training step with glibc's default malloc policy against the one `lorakit train` sets
(`lorakit.host_memory.keep_freed_host_memory`: freed blocks up to 256 MiB stay in the heap for the next step).

SmolLM2-135M-Instruct, LoRA r=8 α=16 on q,k,v,o, dropout 0.05, AdamW, lorakit's fused paths (bench/setups.py),
random tokens, every position a target, no activation checkpointing. For each batch shape, two fresh processes
per round, one per policy, in turn: each runs `--warmup` steps and then times `--steps`. Reported per policy:
the median step time over all rounds, page faults per timed step (the kernel's minor-fault count: a fault is
one 4 KiB page zero-filled on first touch), and the process's peak resident memory.

    .venv/bin/python bench/host_memory.py                       # 4×128, 4×512, 8×1024; table + JSON
    .venv/bin/python bench/host_memory.py --shapes 4x128 --rounds 3

Results: bench/results/host_memory.json.
"""

from __future__ import annotations

import argparse
import json
import resource
import statistics
import time
from pathlib import Path

import torch
from setups import build

from lorakit.host_memory import keep_freed_host_memory

from common import load_average, machine, report, run_child

RESULTS = Path(__file__).parent / "results" / "host_memory.json"
POLICIES = ("glibc", "keep")


def child(policy: str, batch: int, length: int, warmup: int, steps: int) -> dict:
    """Step times, faults per step and peak RSS of `steps` timed lorakit steps under `policy`."""
    applied = keep_freed_host_memory() if policy == "keep" else False
    _, step, _ = build("lorakit")
    generator = torch.Generator().manual_seed(0)
    ids = torch.randint(100, 40000, (batch, length), generator=generator)
    tokens = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    for _ in range(warmup):
        step(tokens)
    faults_before = resource.getrusage(resource.RUSAGE_SELF).ru_minflt
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step(tokens)
        times.append(time.perf_counter() - begin)
    usage = resource.getrusage(resource.RUSAGE_SELF)
    return {
        "applied": applied,
        "step_times": times,
        "faults_per_step": (usage.ru_minflt - faults_before) / steps,
        "peak_rss_mb": usage.ru_maxrss / 1024,
    }


def measure(shape: str, rounds: int, warmup: int, steps: int) -> dict:
    batch, length = (int(n) for n in shape.split("x"))
    runs: dict[str, list[dict]] = {policy: [] for policy in POLICIES}
    for _ in range(rounds):
        for policy in POLICIES:
            args = ["--child", policy, str(batch), str(length), str(warmup), str(steps)]
            runs[policy].append(run_child(__file__, args))
    out = {}
    for policy, results in runs.items():
        assert all(r["applied"] == (policy == "keep") for r in results), f"{policy}: setting not as intended"
        out[policy] = {
            "step_s": statistics.median(t for r in results for t in r["step_times"]),
            "faults_per_step": statistics.median(r["faults_per_step"] for r in results),
            "peak_rss_mb": max(r["peak_rss_mb"] for r in results),
            "runs": results,
        }
    print(f"  {shape}: " + ", ".join(f"{p} {out[p]['step_s']:.2f}s" for p in POLICIES), flush=True)
    return out


def table(results: dict) -> str:
    lines = [
        "| batch | malloc policy | step (median) | ×glibc | page faults per step | peak RSS |",
        "|---|---|---|---|---|---|",
    ]
    for shape, row in results["shapes"].items():
        for policy in POLICIES:
            r = row[policy]
            ratio = r["step_s"] / row["glibc"]["step_s"]
            lines.append(
                f"| {shape.replace('x', '×')} | {policy} | {r['step_s']:.2f} s | {ratio:.2f} | "
                f"{r['faults_per_step']:,.0f} | {r['peak_rss_mb']:,.0f} MB |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--shapes", default="4x128,4x512,8x1024", help="batch×length pairs, e.g. 4x128,8x1024")
    parser.add_argument("--rounds", type=int, default=2, help="processes per policy and shape")
    parser.add_argument("--warmup", type=int, default=1)
    parser.add_argument("--steps", type=int, default=2, help="timed steps per process")
    parser.add_argument("--child", nargs=5, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        policy, *numbers = args.child
        report(child(policy, *(int(n) for n in numbers)))
        return
    results = {"machine": machine(), "settings": vars(args) | {"child": None}, "shapes": {}}
    for shape in args.shapes.split(","):
        results["shapes"][shape] = measure(shape, args.rounds, args.warmup, args.steps)
    results["load_after"] = load_average()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(results))
    meta = results["machine"]
    flags = " ".join(meta["cpu_flags"])
    print(f"\n{meta['cpu']} (flags: {flags}), {meta['cpus']} cores, torch {meta['torch']}, ", end="")
    print(f"{meta['torch_threads']} threads; load before: {meta['load_average']}, after: {results['load_after']}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
