"""`lorakit estimate` against measurement: the peak memory of real training steps on the built-in models.

For each (model, method) one fresh Python process loads the real pretrained model, prepares it for the
method (full fine-tuning, LoRA, or QLoRA = NF4 base + LoRA), and runs three training steps (forward,
backward, gradient clipping, AdamW step, zero_grad) on a batch of B × T random tokens without padding,
exactly as `lorakit.train.loop` does. It reports

    measured = peak RSS during the steps − RSS before the model was loaded

(the peak is read from the kernel's high-water mark VmHWM, which is reset after loading; freed heap
memory is returned to the system with malloc_trim first, so a load-time peak does not count). The
measured figure thus holds the weights, gradients, optimizer state, activations and temporaries, plus
what the estimate's tensor timeline does not model (kernel workspaces, autograd bookkeeping) and the
memory glibc's malloc keeps after frees. Each configuration runs twice: with the default allocator
(compared with the estimate's total) and with MALLOC_MMAP_THRESHOLD_=131072, where every block ≥ 128 KiB
is returned to the system when freed, so the RSS follows the live tensors (compared with the estimate
without its malloc slack: tensor peak + `CPU_RUNTIME_BYTES`, a check of the simulation itself).

    .venv/bin/python bench/estimate_vs_measured.py            # all configurations, table + JSON
    .venv/bin/python bench/estimate_vs_measured.py --batch-size 8 --max-length 256
    .venv/bin/python bench/estimate_vs_measured.py --report   # the saved measurements against today's estimate

Results go to bench/results/estimate_vs_measured_b<B>_t<T>.json (with `uptime`: the cores are shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification

import lorakit
from lorakit.estimation import CPU_RUNTIME_BYTES, estimate
from lorakit.models import BUILTIN_MODELS, model_cache_dir
from lorakit.targets import head_names

from common import (
    MMAP_THRESHOLD_ENV,
    ChildFailed,
    own_weights,
    release_and_reset_peak,
    report,
    run_child,
    status_bytes,
    uptime,
)

CONFIGS = [
    ("smollm2-135m", "full"),
    ("smollm2-135m", "lora"),
    ("smollm2-135m", "qlora"),
    ("minilm-l6", "full"),
    ("minilm-l6", "lora"),
    ("minilm-l6", "qlora"),
]
RESULTS = Path(__file__).parent / "results"


def _results_file(batch_size: int, max_length: int) -> Path:
    return RESULTS / f"estimate_vs_measured_b{batch_size}_t{max_length}.json"


def measure(model_name: str, method: str, batch_size: int, max_length: int) -> dict:
    """Run in a fresh process: load, prepare, train 3 steps; bytes above the pre-load RSS (taken after every
    import, so the libraries' own memory does not count)."""
    torch.manual_seed(0)
    entry = BUILTIN_MODELS[model_name]
    release_and_reset_peak()
    baseline = status_bytes("VmRSS")
    if entry.task == "causal-lm":
        source = model_cache_dir(model_name) if entry.is_gguf else entry.locate()
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=torch.float32)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(
            str(entry.locate()), num_labels=2, dtype=torch.float32
        )
    own_weights(model)
    release_and_reset_peak()
    if method == "qlora":
        lorakit.quantize(model, "nf4")
    if method in ("lora", "qlora"):
        heads = head_names(model) if entry.task == "seq-cls" else None
        lorakit.add_adapter(
            model,
            lorakit.LoraConfig(
                r=8, alpha=16, dropout=0.05, target_modules=list(entry.target_modules), modules_to_save=heads
            ),
        )
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    vocab = model.config.vocab_size
    ids = torch.randint(3, vocab, (batch_size, max_length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids.clone() if entry.task == "causal-lm" else torch.randint(0, 2, (batch_size,))
    model.train()
    release_and_reset_peak()
    loaded = status_bytes("VmRSS")
    begin = time.perf_counter()
    for _ in range(3):
        loss = model(**batch).loss
        loss.backward()
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - begin) / 3
    peak = status_bytes("VmHWM")
    return {
        "model": model_name,
        "method": method,
        "batch_size": batch_size,
        "max_length": max_length,
        "measured_bytes": peak - baseline,
        "loaded_bytes": loaded - baseline,
        "seconds_per_step": seconds,
        "threads": torch.get_num_threads(),
    }


def estimated(model_name: str, method: str, batch_size: int, max_length: int) -> dict:
    est = estimate(model_name, method=method, batch_size=batch_size, max_length=max_length)
    return est.to_dict()


def _header() -> None:
    print(
        f"{'model':14s} {'method':6s} {'estimate':>9s} {'measured':>9s} {'error':>7s}   "
        f"{'no slack':>9s} {'measured':>9s} {'error':>7s}"
    )
    print(f"{'':21s} {'(total)':>9s} {'(malloc)':>9s} {'':7s}   {'':9s} {'(mmap)':>9s}   MB")


def _compare(row: dict, est: dict) -> dict:
    """Total against the default allocator; tensors + runtime (no malloc slack) against MALLOC_MMAP_THRESHOLD_."""
    without_slack = est["tensor_peak_bytes"] + CPU_RUNTIME_BYTES
    row["estimate"] = est
    row["error"] = est["total_bytes"] / row["default"]["measured_bytes"] - 1
    row["error_without_slack"] = without_slack / row["mmap"]["measured_bytes"] - 1
    print(
        f"{row['model']:14s} {row['method']:6s} {est['total_bytes'] / 1e6:9.0f} "
        f"{row['default']['measured_bytes'] / 1e6:9.0f} {100 * row['error']:+6.1f}%   "
        f"{without_slack / 1e6:9.0f} {row['mmap']['measured_bytes'] / 1e6:9.0f} "
        f"{100 * row['error_without_slack']:+6.1f}%",
        flush=True,
    )
    return row


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--only", nargs=2, metavar=("MODEL", "METHOD"), help="measure one configuration (JSON)")
    parser.add_argument("--configs", nargs="*", help="model:method pairs (default: all)")
    parser.add_argument(
        "--report", action="store_true", help="re-estimate and print the table for the saved measurements"
    )
    args = parser.parse_args()
    if args.only:
        report(measure(*args.only, args.batch_size, args.max_length))
        return
    if args.report:
        saved = json.loads(_results_file(args.batch_size, args.max_length).read_text())
        _header()
        for row in saved["rows"]:
            _compare(row, estimated(row["model"], row["method"], saved["batch_size"], saved["max_length"]))
        print(f"measured at: {saved['uptime']}")
        return

    configs = [tuple(c.split(":")) for c in args.configs] if args.configs else CONFIGS
    rows = []
    _header()
    for model_name, method in configs:
        row = {"model": model_name, "method": method}
        try:
            for variant, env in (("default", {}), ("mmap", MMAP_THRESHOLD_ENV)):
                row[variant] = run_child(
                    __file__,
                    [
                        "--only",
                        model_name,
                        method,
                        "--batch-size",
                        str(args.batch_size),
                        "--max-length",
                        str(args.max_length),
                    ],
                    env={"TOKENIZERS_PARALLELISM": "false", **env},
                )
        except ChildFailed as err:
            print(f"{model_name} {method}: measurement failed\n{err}", file=sys.stderr)
            continue
        rows.append(_compare(row, estimated(model_name, method, args.batch_size, args.max_length)))
    measured_at = uptime()
    print(measured_at)
    out = _results_file(args.batch_size, args.max_length)
    out.parent.mkdir(parents=True, exist_ok=True)
    out.write_text(
        json.dumps(
            {"uptime": measured_at, "batch_size": args.batch_size, "max_length": args.max_length, "rows": rows},
            indent=2,
        )
    )
    print(f"written to {out}")


if __name__ == "__main__":
    main()
