"""LoRA vs QLoRA on SmolLM2-135M-Instruct (CPU): weight memory, training memory, step time and loss.

1. Weight memory of the model's linear layers (the 210 q/k/v/o/gate/up/down projections; the output head
   is tied to the embedding and stays float): fp32 vs int8 (absmax per row) vs int8 with zero point vs
   NF4 vs NF4 + double quantization, measured as the bytes of the tensors each format stores.
2. Training, one fresh process per configuration (so each peak is its own): LoRA r=8 on q/k/v/o over the
   fp32 base, and the same adapter over an NF4+DQ base (`--modes` adds int8), N steps of AdamW at batch
   B × up to T tokens of the E2E sample, same seed, same data order. Reported: RSS after setup (model
   quantized, adapter added), peak RSS during the training steps (kernel high-water mark VmHWM, reset just
   before them, with freed heap returned to the system by malloc_trim first so load-time and eval peaks do
   not count), peak RSS of the whole process, median step time, training loss, and the held-out loss
   before and after (no_grad passes: training after the first one must still reach every adapter).

    .venv/bin/python bench/qlora.py                       # table on stdout, JSON in bench/results/qlora.json
    .venv/bin/python bench/qlora.py --steps 10 --modes lora,nf4

The machine's 2 cores are shared with other work: `uptime` load averages are recorded before and after,
and step times taken under a load above the core count are flagged as noisy.
"""

from __future__ import annotations

import argparse
import gc
import json
import os
import resource
import statistics
import time
from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model
from lorakit.quant.int8 import Int8Codec
from lorakit.quant.nf4 import NF4Codec
from lorakit.train.data import Collator, encode_causal, load_data
from lorakit.train.evaluate import mean_loss

from common import ChildFailed, load_average, own_weights, release_and_reset_peak, report, run_child, status_mb

RESULTS = Path(__file__).parent / "results" / "qlora.json"
MODEL = "smollm2-135m"
TARGETS = ["q_proj", "k_proj", "v_proj", "o_proj"]


# -- part 1: weight memory ------------------------------------------------------------------------
def weight_memory() -> dict:
    model, _ = load_model(MODEL)
    tied = model.get_input_embeddings().weight
    linears = [m for m in model.modules() if type(m) is torch.nn.Linear and m.weight is not tied]
    codecs = {
        "int8": Int8Codec(),
        "int8-asym": Int8Codec(zero_point=True),
        "nf4": NF4Codec(double_quant=False),
        "nf4+dq": NF4Codec(double_quant=True),
    }
    params = sum(m.weight.numel() for m in linears)
    table = {"fp32": sum(m.weight.untyped_storage().nbytes() for m in linears)}
    for name, codec in codecs.items():
        table[name] = 0
        for module in linears:
            stored = codec.encode(module.weight)
            table[name] += sum(t.untyped_storage().nbytes() for t in stored.values())
    rows = {
        name: {
            "bytes": b,
            "mib": round(b / 2**20, 2),
            "ratio_to_fp32": round(b / table["fp32"], 4),
            "bits_per_param": round(8 * b / params, 3),
        }
        for name, b in table.items()
    }
    return {"layers": len(linears), "parameters": params, "formats": rows}


# -- part 2: one training run (in its own process) ------------------------------------------------
def train_worker(mode: str, steps: int, batch_size: int, max_length: int, eval_examples: int) -> dict:
    started = time.perf_counter()
    model, tokenizer = load_model(MODEL)
    own_weights(model)  # for both modes, so that RSS measures the tensors the process actually holds
    release_and_reset_peak()
    load_s = time.perf_counter() - started
    rss_loaded = status_mb("VmRSS")
    quant = None
    if mode != "lora":
        began = time.perf_counter()
        report = lorakit.quantize(model, mode)
        quant = {
            "seconds": round(time.perf_counter() - began, 2),
            "summary": report.summary(),
            "float_bytes": report.float_bytes,
            "quantized_bytes": report.quantized_bytes,
        }
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=TARGETS))
    trainable, total = lorakit.trainable_parameters(model)

    train = load_data("e2e", "train", "causal-lm")
    validation = load_data("e2e", "validation", "causal-lm")
    features = [encode_causal(tokenizer, ex, max_length) for ex in train.examples[: steps * batch_size]]
    val_features = [encode_causal(tokenizer, ex, max_length) for ex in validation.examples[:eval_examples]]
    collate = Collator(tokenizer.pad_token_id)
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-3)

    release_and_reset_peak()
    rss_setup, rss_file = status_mb("VmRSS"), status_mb("RssFile")
    eval_before = mean_loss(model, val_features, collate, batch_size=4)  # a no_grad pass before training
    release_and_reset_peak()
    model.train()
    losses, times = [], []
    for step in range(steps):
        batch = collate(features[step * batch_size : (step + 1) * batch_size])
        began = time.perf_counter()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
        times.append(time.perf_counter() - began)
        losses.append(round(loss.item(), 4))
    peak_train = status_mb("VmHWM")
    eval_after = mean_loss(model, val_features, collate, batch_size=4)
    timed = times[1:] if len(times) > 1 else times  # the first step includes one-time set-up
    return {
        "mode": mode,
        "trainable_parameters": trainable,
        "total_parameters": total,
        "load_s": round(load_s, 1),
        "quantize": quant,
        "rss_after_load_mb": round(rss_loaded),
        "rss_file_backed_after_setup_mb": round(rss_file),
        "rss_after_setup_mb": round(rss_setup),
        "peak_rss_training_mb": round(peak_train),
        "peak_rss_process_mb": round(resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024),
        "step_time_median_s": round(statistics.median(timed), 3),
        "step_times_s": [round(t, 3) for t in times],
        "train_losses": losses,
        "train_loss_last5": round(statistics.mean(losses[-5:]), 4),
        "eval_loss_before": round(eval_before, 4),
        "eval_loss_after": round(eval_after, 4),
    }


# -- driver ---------------------------------------------------------------------------------------
def _run_worker(mode: str, args: argparse.Namespace) -> dict:
    arguments = [
        "--worker",
        mode,
        "--steps",
        str(args.steps),
        "--batch-size",
        str(args.batch_size),
        "--max-length",
        str(args.max_length),
        "--eval-examples",
        str(args.eval_examples),
    ]
    env = {"MALLOC_MMAP_THRESHOLD_": str(args.malloc_mmap_threshold)} if args.malloc_mmap_threshold else {}
    try:
        return run_child(__file__, arguments, env)
    except ChildFailed as err:
        raise SystemExit(str(err)) from err


def _print_tables(result: dict) -> None:
    memory = result["weight_memory"]
    print(f"\nWeight memory of SmolLM2-135M's {memory['layers']} linear layers ({memory['parameters']:,} parameters)")
    print(f"{'format':<10}{'MiB':>10}{'× fp32':>10}{'bits/param':>12}")
    for name, row in memory["formats"].items():
        print(f"{name:<10}{row['mib']:>10.2f}{row['ratio_to_fp32']:>10.3f}{row['bits_per_param']:>12.3f}")
    runs = result["training"]
    print(
        f"\nTraining: LoRA r=8 on q,k,v,o, {result['settings']['steps']} steps, batch "
        f"{result['settings']['batch_size']} × ≤{result['settings']['max_length']} tokens"
    )
    rows = [
        ("base weights", lambda r: "fp32" if r["mode"] == "lora" else r["mode"]),
        ("trainable params", lambda r: f"{r['trainable_parameters']:,}"),
        ("RSS after setup (MB)", lambda r: r["rss_after_setup_mb"]),
        ("peak RSS training (MB)", lambda r: r["peak_rss_training_mb"]),
        ("peak RSS process (MB)", lambda r: r["peak_rss_process_mb"]),
        ("median step (s)", lambda r: f"{r['step_time_median_s']:.2f}"),
        ("train loss step 1", lambda r: f"{r['train_losses'][0]:.4f}"),
        ("train loss last 5", lambda r: f"{r['train_loss_last5']:.4f}"),
        ("eval loss before", lambda r: f"{r['eval_loss_before']:.4f}"),
        ("eval loss after", lambda r: f"{r['eval_loss_after']:.4f}"),
    ]
    print(f"{'':<24}" + "".join(f"{r['mode']:>14}" for r in runs))
    for label, cell in rows:
        print(f"{label:<24}" + "".join(f"{cell(r)!s:>14}" for r in runs))
    print(
        f"\nload average before {result['load_average_before']}, after {result['load_average_after']}"
        + (" — above the 2 cores: step times are noisy" if result["noisy"] else "")
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--steps", type=int, default=20)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--eval-examples", type=int, default=16)
    parser.add_argument("--modes", default="lora,nf4", help="comma-separated: lora (fp32 base), nf4, int8, int8-asym")
    parser.add_argument(
        "--malloc-mmap-threshold",
        type=int,
        default=None,
        help="set glibc's MALLOC_MMAP_THRESHOLD_ (bytes) in the training processes, e.g. 131072",
    )
    parser.add_argument("--worker", help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.worker:
        report(train_worker(args.worker, args.steps, args.batch_size, args.max_length, args.eval_examples))
        return

    started = time.perf_counter()
    load_before = load_average()
    memory = weight_memory()
    gc.collect()
    runs = [_run_worker(mode, args) for mode in args.modes.split(",")]
    load_after = load_average()
    result = {
        "model": MODEL,
        "settings": {
            "steps": args.steps,
            "batch_size": args.batch_size,
            "max_length": args.max_length,
            "eval_examples": args.eval_examples,
            "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": TARGETS},
            "lr": 1e-3,
            "malloc_mmap_threshold": args.malloc_mmap_threshold,
        },
        "weight_memory": memory,
        "training": runs,
        "load_average_before": load_before,
        "load_average_after": load_after,
        "cpu_count": os.cpu_count(),
        "noisy": max(load_before[0], load_after[0]) > (os.cpu_count() or 1),
        "total_time_s": round(time.perf_counter() - started, 1),
    }
    RESULTS.parent.mkdir(parents=True, exist_ok=True)
    RESULTS.write_text(json.dumps(result, indent=2) + "\n")
    _print_tables(result)
    print(f"written to {RESULTS} in {result['total_time_s']:.0f}s")


if __name__ == "__main__":
    main()
