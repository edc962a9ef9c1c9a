"""`lorakit estimate` against measurement: the peak memory of real training steps on the built-in models.

For each (model, method) one fresh Python process loads the real pretrained model, prepares it for the
method (full fine-tuning, LoRA with dropout 0.05 as `lorakit train` defaults to, or QLoRA = NF4 base + LoRA),
and runs three training steps of the step `lorakit train` runs (`lorakit.train.step`): its fast paths
(`lorakit.train.fast_paths`: lean gated MLPs, grouped q/k/v down-projections), the loss of
`lorakit.train.loss.causal_lm_loss` (the fused LM-head cross-entropy where it applies), `loss` deleted before the next
forward pass, then gradient clipping, the AdamW step and zero_grad, on a batch of B × T random tokens without padding.
`--precision bf16` loads the model in bfloat16, makes the trainable weights float32
(`lorakit.device.trainable_to_float32`) and runs the forward pass under `lorakit.device.autocast`,
as `lorakit train --precision bf16` does. It reports

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
    .venv/bin/python bench/estimate_vs_measured.py --batch-size 8 --max-length 256 --configs minilm-l6:lora
    .venv/bin/python bench/estimate_vs_measured.py --precision bf16 --configs minilm-l6:full minilm-l6:lora
    .venv/bin/python bench/estimate_vs_measured.py --report   # the saved measurements against today's estimate

Results go to bench/results/estimate_vs_measured_b<B>_t<T>[_bf16].json (with `uptime`: the cores are shared).
"""

from __future__ import annotations

import argparse
import json
import sys
import time
from pathlib import Path

import torch
from torch import nn
from transformers import AutoModelForCausalLM, AutoModelForSequenceClassification, PreTrainedModel

import lorakit
from lorakit.device import PRECISIONS, autocast, trainable_to_float32
from lorakit.estimation import CPU_RUNTIME_BYTES, estimate
from lorakit.models import BUILTIN_MODELS, model_cache_dir
from lorakit.targets import head_names
from lorakit.train.fast_paths import enable_training_fast_paths
from lorakit.train.loss import causal_lm_loss

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
MEASURED_PRECISIONS = ("fp32", "bf16")  # fp16 autocast on a CPU is slower still than emulated bf16
STEPS = 3
# The LoRA measured: lorakit train's rank and alpha until 2026-12-02, kept so the saved peaks stay comparable.
LORA_RANK = {"r": 8, "alpha": 16.0}
RESULTS = Path(__file__).parent / "results"


def results_file(batch_size: int, max_length: int, precision: str = "fp32") -> Path:
    """Where the measurements of one shape and precision are saved (fp32 keeps the older files' names)."""
    suffix = "" if precision == "fp32" else f"_{precision}"
    return RESULTS / f"estimate_vs_measured_b{batch_size}_t{max_length}{suffix}.json"


def load_prepared(model_name: str, method: str, dtype: torch.dtype) -> PreTrainedModel:
    """The built-in model in `dtype`, in anonymous memory, prepared for `method` as `lorakit train` prepared it
    (LoRA of LORA_RANK — its defaults until 2026-12-02 —, dropout 0.05 on the model's target modules; the
    trainable weights in float32)."""
    entry = BUILTIN_MODELS[model_name]
    if entry.task == "causal-lm":
        source = model_cache_dir(model_name) if entry.is_gguf else entry.locate()
        model = AutoModelForCausalLM.from_pretrained(str(source), dtype=dtype)
    else:
        model = AutoModelForSequenceClassification.from_pretrained(str(entry.locate()), num_labels=2, dtype=dtype)
    own_weights(model)
    release_and_reset_peak()
    if method == "qlora":
        lorakit.quantize(model, "nf4")
    if method in ("lora", "qlora"):
        heads = head_names(model) if entry.task == "seq-cls" else None
        config = lorakit.LoraConfig(
            **LORA_RANK, dropout=0.05, target_modules=list(entry.target_modules), modules_to_save=heads
        )
        lorakit.add_adapter(model, config)
    trainable_to_float32(model)
    return model


def backward(model: nn.Module, batch: dict[str, torch.Tensor], dtype: torch.dtype) -> None:
    """Forward and backward as `lorakit.train.step.Stepper` runs them: the loss is a local, freed on return,
    before the optimizer step and the next forward pass."""
    with autocast("cpu", dtype):
        loss = causal_lm_loss(model, batch)
    loss.backward()


def measure(model_name: str, method: str, batch_size: int, max_length: int, precision: str) -> dict:
    """Run in a fresh process: load, prepare, train `STEPS` steps; bytes above the pre-load RSS (taken after
    every import, so the libraries' own memory does not count)."""
    torch.manual_seed(0)
    dtype = PRECISIONS[precision]
    release_and_reset_peak()
    baseline = status_bytes("VmRSS")
    model = load_prepared(model_name, method, dtype)
    enable_training_fast_paths(model)  # as the training loop does around training
    trainable = [p for p in model.parameters() if p.requires_grad]
    optimizer = torch.optim.AdamW(trainable, lr=1e-5)
    ids = torch.randint(3, model.config.vocab_size, (batch_size, max_length))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    causal = BUILTIN_MODELS[model_name].task == "causal-lm"
    batch["labels"] = ids.clone() if causal else torch.randint(0, 2, (batch_size,))
    model.train()
    release_and_reset_peak()
    loaded = status_bytes("VmRSS")
    begin = time.perf_counter()
    for _ in range(STEPS):
        backward(model, batch, dtype)
        torch.nn.utils.clip_grad_norm_(trainable, 1.0)
        optimizer.step()
        optimizer.zero_grad(set_to_none=True)
    seconds = (time.perf_counter() - begin) / STEPS
    peak = status_bytes("VmHWM")
    return {
        "model": model_name,
        "method": method,
        "precision": precision,
        "batch_size": batch_size,
        "max_length": max_length,
        "measured_bytes": peak - baseline,
        "loaded_bytes": loaded - baseline,
        "seconds_per_step": seconds,
        "threads": torch.get_num_threads(),
    }


def estimated(model_name: str, method: str, batch_size: int, max_length: int, precision: str = "fp32") -> dict:
    est = estimate(
        model_name, method=method, batch_size=batch_size, max_length=max_length, dtype=precision, **LORA_RANK
    )
    return est.to_dict()


def _header() -> None:
    print(
        f"{'model':14s} {'method':6s} {'estimate':>9s} {'measured':>9s} {'error':>7s}   "
        f"{'no slack':>9s} {'measured':>9s} {'error':>7s}"
    )
    print(f"{'':21s} {'(total)':>9s} {'(malloc)':>9s} {'':7s}   {'':9s} {'(mmap)':>9s}   MB")


def comparison(row: dict, est: dict) -> dict:
    """`row` (the two measurements of a configuration) with today's estimate and the two errors: the total
    against the default allocator; tensors + runtime (no malloc slack) against MALLOC_MMAP_THRESHOLD_."""
    without_slack = est["tensor_peak_bytes"] + CPU_RUNTIME_BYTES
    return {
        **row,
        "estimate": est,
        "estimate_without_slack": without_slack,
        "error": est["total_bytes"] / row["default"]["measured_bytes"] - 1,
        "error_without_slack": without_slack / row["mmap"]["measured_bytes"] - 1,
    }


def _compare(row: dict, est: dict) -> dict:
    """The comparison of `row` with `est`, printed as a line of the table."""
    row = comparison(row, est)
    print(
        f"{row['model']:14s} {row['method']:6s} {est['total_bytes'] / 1e6:9.0f} "
        f"{row['default']['measured_bytes'] / 1e6:9.0f} {100 * row['error']:+6.1f}%   "
        f"{row['estimate_without_slack'] / 1e6:9.0f} {row['mmap']['measured_bytes'] / 1e6:9.0f} "
        f"{100 * row['error_without_slack']:+6.1f}%",
        flush=True,
    )
    return row


def report_saved(batch_size: int, max_length: int, precision: str) -> None:
    """The saved measurements against today's estimate."""
    saved = json.loads(results_file(batch_size, max_length, precision).read_text())
    _header()
    for row in saved["rows"]:
        _compare(row, estimated(row["model"], row["method"], batch_size, max_length, precision))
    print(f"measured at: {saved['uptime']}")


def measure_all(configs: list[tuple[str, str]], batch_size: int, max_length: int, precision: str) -> None:
    """Each configuration in two fresh processes (default malloc, then MALLOC_MMAP_THRESHOLD_); table + JSON."""
    rows = []
    shape = ["--batch-size", str(batch_size), "--max-length", str(max_length), "--precision", precision]
    _header()
    for model_name, method in configs:
        row: dict = {"model": model_name, "method": method}
        try:
            for variant, env in (("default", {}), ("mmap", MMAP_THRESHOLD_ENV)):
                row[variant] = run_child(
                    __file__, ["--only", model_name, method, *shape], env={"TOKENIZERS_PARALLELISM": "false", **env}
                )
        except ChildFailed as err:
            print(f"{model_name} {method}: measurement failed\n{err}", file=sys.stderr)
            continue
        rows.append(_compare(row, estimated(model_name, method, batch_size, max_length, precision)))
    measured_at = uptime()
    print(measured_at)
    out = results_file(batch_size, max_length, precision)
    out.parent.mkdir(parents=True, exist_ok=True)
    saved = {
        "uptime": measured_at,
        "batch_size": batch_size,
        "max_length": max_length,
        "precision": precision,
        "rows": rows,
    }
    out.write_text(json.dumps(saved, indent=2) + "\n")
    print(f"written to {out}")


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--batch-size", type=int, default=4)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--precision", choices=MEASURED_PRECISIONS, default="fp32")
    parser.add_argument("--only", nargs=2, metavar=("MODEL", "METHOD"), help="measure one configuration (JSON)")
    parser.add_argument("--configs", nargs="*", help="model:method pairs (default: all)")
    parser.add_argument(
        "--report", action="store_true", help="re-estimate and print the table for the saved measurements"
    )
    args = parser.parse_args()
    if args.only:
        model_name, method = args.only
        report(measure(model_name, method, args.batch_size, args.max_length, args.precision))
    elif args.report:
        report_saved(args.batch_size, args.max_length, args.precision)
    else:
        configs = [tuple(c.split(":")) for c in args.configs] if args.configs else CONFIGS
        measure_all(configs, args.batch_size, args.max_length, args.precision)


if __name__ == "__main__":
    main()
