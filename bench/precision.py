"""Training step in fp32 vs bf16 mixed precision, side by side on one device: the floor, lorakit, PEFT 0.21.2 and
full fine-tuning in each (bench/setups.py: SmolLM2-135M-Instruct, LoRA r=8 α=16 on q,k,v,o with dropout 0.05,
AdamW, forward, backward, gradient clipping, AdamW step over random tokens, every position a target). In bf16 the
forward runs under `torch.autocast(device, bfloat16)` over a base stored in bfloat16 with float32 adapters, as
`lorakit train --precision bf16` runs it; full fine-tuning keeps float32 master weights.

Step time: the set-ups live in one process and take turns, one step each per round (alternation, so drift in the
machine's load hits all alike); the median over rounds, synchronised on CUDA. Each row's ×floor is to the floor in
the same precision; FLOPs are counted on the warm-up step (`torch.utils.flop_counter`) and MFU is the achieved
FLOP/s over this run's matrix-product rate in that precision (fp32, "bf16 autocast"). Peak memory: one fresh
process per set-up and shape, the peak during 3 steps minus the memory just before them (model loaded, adapter
added), i.e. what training adds above the loaded model: the RSS high-water mark on the CPU
(MALLOC_MMAP_THRESHOLD_=131072, as bench/train_step.py measures it), `torch.cuda.max_memory_allocated` on CUDA.

    .venv/bin/python bench/precision.py --device cpu                      # 4×128 and 4×512
    .venv/bin/python bench/precision.py --device cuda --steps 20
    .venv/bin/python bench/precision.py --steps 1 --shapes 1x16 --no-save  # smoke check (seconds, nothing written)

First, and alone with `--gemm-only`, the matrix products a step is made of (SmolLM2's MLP shape, 512 rows):
GFLOP/s in float32, bfloat16, float16 and under bf16 autocast over float32 operands. This is the measurement
behind `--precision auto` on the CPU: where bf16 products are not faster than float32 (no AVX512-BF16 or AMX,
so PyTorch falls back to a scalar path), a bf16 step cannot be either.

    .venv/bin/python bench/precision.py --gemm-only                        # seconds

Results: bench/results/precision_<device type>.json (precision_<device type>_gemm.json with --gemm-only),
with the machine (CPU and its flags, GPU) and the load.
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path
from typing import Any

import torch
from setups import LIBRARIES, MODEL, PRECISIONS, Step, build, step_flops

from lorakit.device import resolve_device, synchronize

from common import (
    GEMM_SHAPE,
    MMAP_THRESHOLD_ENV,
    gemm_rates,
    machine,
    own_weights,
    release_and_reset_peak,
    report,
    run_child,
    status_mb,
)

RESULTS = Path(__file__).parent / "results"
SETUPS = tuple(f"{library} {precision}" for precision in PRECISIONS for library in LIBRARIES)
BASELINE = "lorakit fp32"
GEMM_OF = {"fp32": "fp32", "bf16": "bf16 autocast"}  # the matrix-product rate each precision's MFU is against


# -- the set-ups --------------------------------------------------------------------------------------------
def build_setup(setup: str, device: torch.device) -> tuple[torch.nn.Module, Step]:
    """A freshly loaded model on `device` prepared for `setup` ("<library> <precision>"), and its step function."""
    library, precision = setup.split()
    model, step, _ = build(library, precision, device)
    return model, step


def token_batch(shape: tuple[int, int], device: torch.device, vocab: int = 49152) -> dict[str, torch.Tensor]:
    batch, length = shape
    ids = torch.randint(3, vocab, (batch, length), generator=torch.Generator().manual_seed(length)).to(device)
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def parse_shapes(text: str) -> list[tuple[int, int]]:
    """ "4x128,4x512" → [(4, 128), (4, 512)] (batch × length)."""
    shapes = []
    for item in text.split(","):
        batch, _, length = item.lower().replace("×", "x").partition("x")
        shapes.append((int(batch), int(length)))
    return shapes


# -- memory, in a fresh process -----------------------------------------------------------------------------
def memory_child(setup: str, shape: tuple[int, int], device: torch.device) -> dict[str, Any]:
    """Training memory above the loaded, prepared model over 3 steps (MiB), and the loaded model's own."""
    model, step = build_setup(setup, device)
    batch = token_batch(shape, device)
    if device.type == "cuda":
        synchronize(device)
        loaded = torch.cuda.memory_allocated(device)
        torch.cuda.reset_peak_memory_stats(device)
        for _ in range(3):
            step(batch)
        synchronize(device)
        peak = torch.cuda.max_memory_allocated(device) - loaded
        return {"peak_above_loaded_mb": peak / 2**20, "loaded_mb": loaded / 2**20, "measure": "cuda allocated"}
    own_weights(model)
    release_and_reset_peak()
    before = status_mb("VmRSS")
    for _ in range(3):
        step(batch)
    return {"peak_above_loaded_mb": status_mb("VmHWM") - before, "loaded_mb": before, "measure": "rss"}


def measure_memory(setup: str, shape: tuple[int, int], device: str) -> dict[str, Any]:
    args = ["--child", setup, f"{shape[0]}x{shape[1]}", "--device", device]
    return run_child(__file__, args, MMAP_THRESHOLD_ENV)


# -- step times, alternating --------------------------------------------------------------------------------
def bench_shape(built: dict[str, Step], shape: tuple[int, int], device: torch.device, rounds: int) -> dict:
    batch = token_batch(shape, device)
    times: dict[str, list[float]] = {setup: [] for setup in built}
    flops = {setup: step_flops(step, batch) for setup, step in built.items()}  # also one warm-up step each
    for _ in range(rounds):
        for setup, step in built.items():
            synchronize(device)
            begin = time.perf_counter()
            step(batch)
            synchronize(device)
            times[setup].append(time.perf_counter() - begin)
    return {
        setup: {"step_s": statistics.median(t), "step_times": t, "flops": flops[setup]} for setup, t in times.items()
    }


def run_all(args: argparse.Namespace, device: torch.device, setups: list[str]) -> dict[str, Any]:
    built = {setup: build_setup(setup, device)[1] for setup in setups}
    out: dict[str, Any] = {}
    for shape in parse_shapes(args.shapes):
        label = f"{shape[0]}x{shape[1]}"
        row = bench_shape(built, shape, device, args.steps)
        for setup in setups:
            row[setup].update(measure_memory(setup, shape, str(device)) if args.memory else {})
        out[label] = row
        print(f"  {label}: " + ", ".join(f"{s} {row[s]['step_s']:.3f}s" for s in setups), flush=True)
    return out


# -- matrix products ----------------------------------------------------------------------------------------
def gemm_table(rates: dict[str, float]) -> str:
    m, k, n = GEMM_SHAPE
    lines = [f"| {m}×{k} @ {k}×{n} | GFLOP/s | ×fp32 |", "|---|---|---|"]
    lines += [f"| {name} | {rate:.1f} | {rate / rates['fp32']:.3f} |" for name, rate in rates.items()]
    return "\n".join(lines)


# -- report -------------------------------------------------------------------------------------------------
def device_info(device: torch.device) -> dict[str, Any]:
    info: dict[str, Any] = {"device": str(device), **machine()}
    if device.type == "cuda":
        props = torch.cuda.get_device_properties(device)
        info.update(
            gpu=props.name,
            gpu_memory_gib=round(props.total_memory / 2**30, 1),
            compute_capability=f"{props.major}.{props.minor}",
            cuda=torch.version.cuda,
            bf16_supported=torch.cuda.is_bf16_supported(),
        )
    return info


def table(shapes: dict[str, dict], gemm: dict[str, float]) -> str:
    """Step time, its ratio to the floor in the same precision and to lorakit fp32, MFU, and memory."""
    lines = [
        "| shape | setup | step (median) | ×floor | ×lorakit fp32 | MFU | peak above model | ×lorakit fp32 "
        "| loaded model |",
        "|---|---|---|---|---|---|---|---|---|",
    ]
    for label, row in shapes.items():
        base = row.get(BASELINE)
        for setup, r in row.items():
            precision = setup.split()[1]
            floor = row.get(f"floor {precision}")
            floor_ratio = f"{r['step_s'] / floor['step_s']:.2f}" if floor else "–"
            step_ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "–"
            mfu = f"{100 * r['flops'] / r['step_s'] / (gemm[GEMM_OF[precision]] * 1e9):.0f} %"
            if "peak_above_loaded_mb" in r:
                peak = f"{r['peak_above_loaded_mb']:.0f} MB"
                peak_ratio = f"{r['peak_above_loaded_mb'] / base['peak_above_loaded_mb']:.2f}" if base else "–"
                loaded = f"{r['loaded_mb']:.0f} MB"
            else:
                peak = peak_ratio = loaded = "–"
            lines.append(
                f"| {label} | {setup} | {1e3 * r['step_s']:.1f} ms | {floor_ratio} | {step_ratio} | {mfu} | {peak} | "
                f"{peak_ratio} | {loaded} |"
            )
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--device", default="cpu", help="auto, cpu, cuda, cuda:N or mps")
    parser.add_argument("--shapes", default="4x128,4x512", help="batch×length, comma-separated")
    parser.add_argument("--steps", type=int, default=10, help="alternation rounds (timed steps per set-up)")
    parser.add_argument("--setups", default=",".join(SETUPS), help="comma-separated, of: " + ", ".join(SETUPS))
    parser.add_argument("--no-memory", dest="memory", action="store_false", help="skip the memory processes")
    parser.add_argument("--no-save", dest="save", action="store_false", help="print only, write no results file")
    parser.add_argument("--gemm-only", action="store_true", help="only the matrix-product rates (seconds)")
    parser.add_argument("--child", nargs=2, help=argparse.SUPPRESS)
    args = parser.parse_args()
    device = resolve_device(args.device)
    if args.child:
        report(memory_child(args.child[0], parse_shapes(args.child[1])[0], device))
        return
    setups = [s.strip() for s in args.setups.split(",")]
    if unknown := set(setups) - set(SETUPS):
        parser.error(f"unknown setup(s) {', '.join(sorted(unknown))}; expected: {', '.join(SETUPS)}")
    results: dict[str, Any] = {"machine": device_info(device), "steps": args.steps, "model": MODEL}
    began = time.perf_counter()
    results["gemm_gflops"] = gemm_rates(device)
    print(gemm_table(results["gemm_gflops"]), flush=True)
    if not args.gemm_only:
        print(f"training steps on {device}", flush=True)
        results["shapes"] = run_all(args, device, setups)
        print(table(results["shapes"], results["gemm_gflops"]))
    results.update(minutes=(time.perf_counter() - began) / 60, load_after=machine()["load_average"])
    info = results["machine"]
    print(f"\n{info.get('gpu', info['cpu'])}; cpu flags {' '.join(info['cpu_flags'])}; torch {info['torch']}")
    if args.save:
        path = RESULTS / f"precision_{device.type}{'_gemm' if args.gemm_only else ''}.json"
        path.parent.mkdir(parents=True, exist_ok=True)
        path.write_text(json.dumps(results, indent=2))
        print(f"written to {path}")


if __name__ == "__main__":
    main()
