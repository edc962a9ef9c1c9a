"""Speed and memory of LoRA training and inference: lorakit vs PEFT 0.21.2 vs full fine-tuning, side by side.

SmolLM2-135M-Instruct (fp32, CPU), LoRA r=8 α=16 on q,k,v,o with dropout 0.05, AdamW; the set-ups of
bench/setups.py, where lorakit runs as its training loop does (fused LoRA dropout product, grouped q/k/v
down-projections, gated MLPs saving two of three intermediates, fused LM head + loss). The same rows in bf16 mixed
precision, and on a GPU: bench/precision.py.

1. Training step (forward, backward, gradient clipping, AdamW step) at batch 4 × 128 and 4 × 512 random
   tokens, every position a target, beside the **floor**: the frozen model's forward plus the input-gradient
   half of its backward (gradients reach the input embeddings, no weight gets one, no optimizer), with
   lorakit's loss — what any LoRA step must at least cost. FLOPs per step are counted on one real step of
   each set-up (`torch.utils.flop_counter`), and model FLOPs utilisation (MFU) is the achieved FLOP/s over
   the float32 matrix-product rate measured in the same run (`common.gemm_rates`, SmolLM2's MLP shape).
   Step time: the four set-ups live in one process and take turns, one step each per round (alternation,
   so drift in the machine's load hits all alike); the
   median over rounds is reported. That process keeps freed host memory for reuse, as `lorakit train` does
   (`lorakit.host_memory`), for all four alike. Peak memory: one fresh process per set-up and length with
   MALLOC_MMAP_THRESHOLD_=131072 (freed blocks go back to the system, so the RSS follows live tensors);
   the peak is the kernel's high-water mark during 3 steps minus the RSS just before them (model loaded,
   method applied) — the memory training adds above the loaded model.
2. End to end on the E2E sample (`bench/e2e_speed.py`): non-padding tokens per second of lorakit's loop, of the
   floor on lorakit's own batches and of PEFT + transformers `Trainer` with the seeds' recipe, each in its own
   process, and the adapters' held-out loss.
3. Inference at 4 × 128 (no_grad): forward latency of the base model, lorakit LoRA unmerged and merged, and
   PEFT unmerged, alternating; greedy generation tokens/s (4 prompts, 32 new tokens).

    .venv/bin/python bench/train_step.py                # everything (~15 min on 2 cores), table + JSON
    .venv/bin/python bench/train_step.py --parts step   # or e2e, infer; --rounds, --e2e-steps to shorten

Results: bench/results/train_step.json, with `uptime` before and after (the cores may be shared).
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from pathlib import Path

import torch
from e2e_speed import E2E_SETUPS, e2e_child, e2e_table
from setups import LIBRARIES, MODEL, TARGETS, build, step_flops

from lorakit.host_memory import keep_freed_host_memory

from common import (
    MMAP_THRESHOLD_ENV,
    gemm_rates,
    machine,
    own_weights,
    release_and_reset_peak,
    report,
    run_child,
    status_mb,
    uptime,
)

RESULTS = Path(__file__).parent / "results" / "train_step.json"
SETUPS = LIBRARIES
LENGTHS = (128, 512)
BATCH = 4


def token_batch(length: int, vocab: int = 49152) -> dict[str, torch.Tensor]:
    ids = torch.randint(3, vocab, (BATCH, length), generator=torch.Generator().manual_seed(length))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}


def memory_child(setup: str, length: int) -> dict:
    """In a fresh process: training memory above the loaded, prepared model over 3 steps."""
    model, step, _ = build(setup)
    own_weights(model)
    batch = token_batch(length)
    release_and_reset_peak()
    before = status_mb("VmRSS")
    for _ in range(3):
        step(batch)
    return {"setup": setup, "length": length, "peak_above_loaded_mb": status_mb("VmHWM") - before, "loaded_mb": before}


def _in_child(part: str, *args: str) -> dict:
    return run_child(__file__, ["--child", part, *args], MMAP_THRESHOLD_ENV if part == "memory" else None)


def bench_steps(rounds: dict[int, int]) -> dict:
    keep_freed_host_memory()
    built = {setup: build(setup) for setup in SETUPS}
    gemm = gemm_rates(torch.device("cpu"))["fp32"]
    out = {"trainable": {s: built[s][2] for s in SETUPS}, "gemm_fp32_gflops": gemm, "lengths": {}}
    for length in LENGTHS:
        batch = token_batch(length)
        times = {s: [] for s in SETUPS}
        flops = {s: step_flops(built[s][1], batch) for s in SETUPS}  # also the warm-up step of each
        for _ in range(rounds[length]):
            for setup in SETUPS:
                begin = time.perf_counter()
                built[setup][1](batch)
                times[setup].append(time.perf_counter() - begin)
        memory = {s: _in_child("memory", s, str(length))["peak_above_loaded_mb"] for s in SETUPS}
        out["lengths"][length] = {
            s: {
                "step_s": statistics.median(times[s]),
                "step_times": times[s],
                "peak_mb": memory[s],
                "flops": flops[s],
                "mfu": flops[s] / statistics.median(times[s]) / (gemm * 1e9),
            }
            for s in SETUPS
        }
        print(
            f"  {BATCH}×{length}: "
            + ", ".join(f"{s} {statistics.median(times[s]):.2f}s {memory[s]:.0f}MB" for s in SETUPS),
            flush=True,
        )
    return out


# -- inference -----------------------------------------------------------------------------------
@torch.no_grad()
def bench_inference(rounds: int) -> dict:
    from peft import LoraConfig, get_peft_model

    import lorakit
    from lorakit.generate import generate_texts
    from lorakit.models import load_model

    base, tokenizer = load_model(MODEL, "causal-lm")
    unmerged, _ = load_model(MODEL, "causal-lm")
    merged, _ = load_model(MODEL, "causal-lm")
    peft_model, _ = load_model(MODEL, "causal-lm")
    config = lorakit.LoraConfig(r=8, alpha=16, target_modules=TARGETS)
    for model in (unmerged, merged):
        lorakit.add_adapter(model, config)
        for name, p in model.named_parameters():
            if "lora_B" in name:  # a trained-looking adapter, not B = 0
                p.normal_(0, 0.02, generator=torch.Generator().manual_seed(1))
    peft_model = get_peft_model(peft_model, LoraConfig(r=8, lora_alpha=16, target_modules=TARGETS))
    lorakit.merge(merged)
    models = {"base": base, "lorakit unmerged": unmerged, "lorakit merged": merged, "peft unmerged": peft_model}
    for model in models.values():
        model.eval()
    batch = token_batch(128)
    del batch["labels"]
    times = {name: [] for name in models}
    for model in models.values():
        model(**batch)
    for _ in range(rounds):
        for name, model in models.items():
            begin = time.perf_counter()
            model(**batch)
            times[name].append(time.perf_counter() - begin)
    prompts = [
        "name[The Eagle], eatType[coffee shop], food[French]",
        "name[Alimentum], area[city centre]",
        "name[Zizzi], priceRange[cheap], customer rating[5 out of 5]",
        "name[Cotto], near[The Bakers]",
    ]
    gen = {}
    for name, model in models.items():
        generate_texts(model, tokenizer, prompts, 4)  # warm-up
        begin = time.perf_counter()
        texts = generate_texts(model, tokenizer, prompts, 32)
        seconds = time.perf_counter() - begin
        new_tokens = sum(len(tokenizer(t, add_special_tokens=False)["input_ids"]) for t in texts)
        gen[name] = {"seconds": seconds, "tokens_per_s": new_tokens / seconds}
    base_ms = statistics.median(times["base"]) * 1e3
    return {
        name: {
            "forward_ms": statistics.median(t) * 1e3,
            "overhead_vs_base": statistics.median(t) * 1e3 / base_ms - 1,
            "generate_tokens_per_s": gen[name]["tokens_per_s"],
        }
        for name, t in times.items()
    }


# -- report --------------------------------------------------------------------------------------
def table(results: dict) -> str:
    """The saved results as markdown tables (the README's \"train-step\" table, via bench/readme_tables.py)."""
    lines = []
    if "steps" in results:
        lines += [
            "| batch | setup | step (median) | ×floor | ×PEFT | ×full | GFLOP | MFU | peak above model | ×PEFT |",
            "|---|---|---|---|---|---|---|---|---|---|",
        ]
        for length, row in results["steps"]["lengths"].items():
            for setup in [s for s in SETUPS if s in row]:  # results saved before the floor row have none
                r = row[setup]
                floor = f"{r['step_s'] / row['floor']['step_s']:.2f}" if "floor" in row else "–"
                flops = f"{r['flops'] / 1e9:.0f} | {100 * r['mfu']:.0f} %" if "flops" in r else "– | –"
                lines.append(
                    f"| {BATCH}×{length} | {setup} | {r['step_s']:.2f} s | {floor} | "
                    f"{r['step_s'] / row['peft']['step_s']:.2f} | "
                    f"{r['step_s'] / row['full']['step_s']:.2f} | {flops} | "
                    f"{r['peak_mb']:.0f} MB | {r['peak_mb'] / row['peft']['peak_mb']:.2f} |"
                )
        if "gemm_fp32_gflops" in results["steps"]:
            lines.append(f"\nfloat32 matrix products: {results['steps']['gemm_fp32_gflops']:.1f} GFLOP/s (MFU's peak)")
    if "e2e" in results:
        lines += ["", *e2e_table(results["e2e"])]
    if "inference" in results:
        lines += ["", "| inference 4×128 | forward | overhead vs base | generate tokens/s |", "|---|---|---|---|"]
        for name, r in results["inference"].items():
            lines.append(
                f"| {name} | {r['forward_ms']:.0f} ms | {100 * r['overhead_vs_base']:+.1f} % | "
                f"{r['generate_tokens_per_s']:.1f} |"
            )
    return "\n".join(lines)


def machine_text(results: dict) -> str:
    """The machine and its load around the run, as the results file holds them."""
    m = results["machine"]
    return (
        f"{m['cpu']} (flags: {' '.join(m['cpu_flags'])}), {m['cpus']} cores, torch {m['torch']}, "
        f"{m['torch_threads']} threads; load before: {results['uptime_before'].split('load average: ')[-1]}, "
        f"after: {results['uptime_after'].split('load average: ')[-1]}"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--parts", default="step,e2e,infer")
    parser.add_argument("--rounds", type=int, default=12, help="alternation rounds at 4×128 (a third at 4×512)")
    parser.add_argument("--e2e-steps", type=int, default=20)
    parser.add_argument("--infer-rounds", type=int, default=15)
    parser.add_argument("--child", nargs="+", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        part, *rest = args.child
        report(memory_child(rest[0], int(rest[1])) if part == "memory" else e2e_child(rest[0], int(rest[1])))
        return

    parts = args.parts.split(",")
    results = json.loads(RESULTS.read_text()) if RESULTS.is_file() else {}
    results.update(machine=machine(), uptime_before=uptime())
    if "step" in parts:
        print("training steps", flush=True)
        results["steps"] = bench_steps({128: args.rounds, 512: max(3, args.rounds // 3)})
    if "e2e" in parts:
        print("end to end on E2E", flush=True)
        results["e2e"] = {setup: _in_child("e2e", setup, str(args.e2e_steps)) for setup in E2E_SETUPS}
    if "infer" in parts:
        print("inference", flush=True)
        results["inference"] = bench_inference(args.infer_rounds)
    results["uptime_after"] = uptime()
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(results, indent=2))
    print(table(results))
    print(f"\n{machine_text(results)}")
    print(f"written to {RESULTS}")


if __name__ == "__main__":
    main()
