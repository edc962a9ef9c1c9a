"""Training step in fp32 vs bf16 mixed precision, lorakit vs PEFT 0.21.2, side by side on one device.

SmolLM2-135M-Instruct (the built-in `smollm2-135m`), LoRA r=8 α=16 on q,k,v,o with dropout 0.05, AdamW, the same
step as bench/train_step.py (forward, backward, gradient clipping, AdamW step) over random tokens, every position
a target. Four set-ups:

- lorakit fp32: the model in float32, lorakit's fused paths as its training loop uses them;
- lorakit bf16: the frozen base stored in bfloat16, float32 adapters (`autocast_adapter_dtype=True`), the forward
  under `torch.autocast(device, bfloat16)`;
- PEFT fp32, and PEFT bf16 under the same autocast (PEFT keeps its adapters in float32 by default too).

Step time: the four live in one process and take turns, one step each per round (alternation, so drift in the
machine's load hits all alike); the median over rounds, synchronised on CUDA. Peak memory: one fresh process per
set-up and shape, the peak during 3 steps minus the memory just before them (model loaded, adapter added), i.e.
what training adds above the loaded model: the RSS high-water mark on the CPU (MALLOC_MMAP_THRESHOLD_=131072, as
bench/train_step.py measures it), `torch.cuda.max_memory_allocated` on CUDA. Ratios are to lorakit fp32.

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
from collections.abc import Callable
from pathlib import Path
from typing import Any

import torch
from train_step import MODEL, TARGETS

from lorakit.device import autocast, resolve_device, synchronize

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
SETUPS = ("lorakit fp32", "lorakit bf16", "peft fp32", "peft bf16")
BASELINE = "lorakit fp32"
Step = Callable[[dict[str, torch.Tensor]], float]


# -- the four set-ups ---------------------------------------------------------------------------------------
def build(setup: str, device: torch.device) -> tuple[torch.nn.Module, Step]:
    """A freshly loaded model on `device` prepared for `setup` ("<library> <precision>"), and its step function."""
    import lorakit
    from lorakit.models import load_model
    from lorakit.train.loss import causal_lm_loss

    library, precision = setup.split()
    dtype = torch.bfloat16 if precision == "bf16" else torch.float32
    torch.manual_seed(0)
    model, _ = load_model(MODEL, "causal-lm", dtype=dtype)
    model.to(device)
    if library == "lorakit":
        from lorakit.train.fast_paths import enable_training_fast_paths

        config = lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=TARGETS)
        lorakit.add_adapter(model, config, autocast_adapter_dtype=True)
        enable_training_fast_paths(model)  # as lorakit's training loop does
        loss_of: Callable[[Any, dict], torch.Tensor] = causal_lm_loss
    else:
        from peft import LoraConfig, get_peft_model

        config = LoraConfig(r=8, lora_alpha=16, lora_dropout=0.05, target_modules=TARGETS, task_type="CAUSAL_LM")
        model = get_peft_model(model, config, autocast_adapter_dtype=True)
        loss_of = lambda m, batch: m(**batch).loss  # noqa: E731
    model.train()
    params = [p for p in model.parameters() if p.requires_grad]
    assert all(p.dtype == torch.float32 for p in params), f"{setup}: adapters not in float32"
    optimizer = torch.optim.AdamW(params, lr=1e-5)

    def step(batch: dict[str, torch.Tensor]) -> float:
        with autocast(device, dtype):  # nothing at all in fp32
            loss = loss_of(model, batch)
        loss.backward()
        torch.nn.utils.clip_grad_norm_(params, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        return loss.detach().item()  # waits for the device

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
    model, step = build(setup, device)
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
    losses = {setup: step(batch) for setup, step in built.items()}  # one warm-up step each
    for _ in range(rounds):
        for setup, step in built.items():
            synchronize(device)
            begin = time.perf_counter()
            step(batch)
            synchronize(device)
            times[setup].append(time.perf_counter() - begin)
    return {
        setup: {"step_s": statistics.median(t), "step_times": t, "first_loss": losses[setup]}
        for setup, t in times.items()
    }


def run_all(args: argparse.Namespace, device: torch.device, setups: list[str]) -> dict[str, Any]:
    built = {setup: build(setup, device)[1] for setup in setups}
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


def table(shapes: dict[str, dict]) -> str:
    lines = [
        "| shape | setup | step (median) | ×lorakit fp32 | peak above model | ×lorakit fp32 | loaded model |",
        "|---|---|---|---|---|---|---|",
    ]
    for label, row in shapes.items():
        base = row.get(BASELINE)
        for setup, r in row.items():
            step_ratio = f"{r['step_s'] / base['step_s']:.2f}" if base else "–"
            if "peak_above_loaded_mb" in r:
                peak = f"{r['peak_above_loaded_mb']:.0f} MB"
                peak_ratio = f"{r['peak_above_loaded_mb'] / base['peak_above_loaded_mb']:.2f}" if base else "–"
                loaded = f"{r['loaded_mb']:.0f} MB"
            else:
                peak = peak_ratio = loaded = "–"
            lines.append(
                f"| {label} | {setup} | {1e3 * r['step_s']:.1f} ms | {step_ratio} | {peak} | {peak_ratio} | {loaded} |"
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
        print(table(results["shapes"]))
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
