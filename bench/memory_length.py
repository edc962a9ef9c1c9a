"""Training memory against sequence length, measured beside `lorakit estimate` (issue 17's curve).

SmolLM2-135M-Instruct (fp32, CPU), LoRA r=8 α=16 on q,k,v,o with dropout 0.05, AdamW: the lorakit step of
bench/setups.py (`setups.build("lorakit")`: fused LoRA product, lean gated MLPs, fused LM head + loss,
gradient clipping, AdamW), on B × T random tokens without padding, every position a target. Each point runs
in a fresh process with MALLOC_MMAP_THRESHOLD_=131072 (freed blocks go back to the system, so the RSS follows
the live tensors), with activation checkpointing off and on (on: `lorakit.train.checkpointing
.enable_checkpointing`, the function `lorakit train --grad-checkpointing on` calls):

* peak above the model = the kernel's high-water mark VmHWM during the steps − the RSS just before them (model
  loaded, adapter added): gradients, optimizer state, activations and temporaries;
* step time = the median over the steps (the first included: it also creates AdamW's state). With the
  mmap threshold every large tensor is fresh pages, so steps are a little slower than with the default malloc;
  checkpointing off and on pay that alike;
* beside them, `lorakit estimate` for the same shape (`lorakit.estimation.estimate`), above the weights: its
  simulated tensor peak + `CPU_RUNTIME_BYTES` (what the mmap-threshold RSS is compared with, as in
  bench/estimate_vs_measured.py) and its total with the malloc slack of the default allocator (the figure
  `lorakit estimate` prints and `--grad-checkpointing auto` plans with).

The curve is batch 1 × T = 256 … 4096; batch 8 × 1024 (the issue's goal: ≤ 2.5 GB above the model with the step
within 1.2 × of today's) runs after it, with fewer steps, and with `--shape-modes` also with only the first N
blocks checkpointed (`lorakit train --grad-checkpointing N`) or `auto:GB`: the count `lorakit train
--memory-limit GB` takes for that shape (the fewest blocks whose estimated step, malloc slack included, fits).

    .venv/bin/python bench/memory_length.py                       # the curve and 8 × 1024 (table, JSON, plot)
    .venv/bin/python bench/memory_length.py --lengths 256 1024 --shapes 4x512 --steps 2
    .venv/bin/python bench/memory_length.py --quick               # T = 128, 256 only: the plumbing, in a minute
    .venv/bin/python bench/memory_length.py --lengths --shape-modes off 22 auto:2.5 on --shape-steps 1 \
        --output bench/results/memory_blocks.json                 # 8 × 1024 only: some blocks checkpointed
    .venv/bin/python bench/memory_length.py --report              # the saved points against today's estimate

Results: bench/results/memory_length.json (written again after every point, so a long run that stops keeps what
it measured) and memory_length.png (x: tokens per step, log 2; y: MB above the model); the README's
"memory-length" table is generated from the JSON by bench/readme_tables.py.
"""

from __future__ import annotations

import argparse
import json
import statistics
import sys
import time
from pathlib import Path
from typing import Any

import setups
import torch
import train_step

from common import (
    MMAP_THRESHOLD_ENV,
    ChildFailed,
    machine,
    own_weights,
    release_and_reset_peak,
    report,
    run_child,
    status_bytes,
    uptime,
)

RESULTS = Path(__file__).parent / "results"
JSON_FILE = RESULTS / "memory_length.json"
PLOT_FILE = RESULTS / "memory_length.png"
LENGTHS = (256, 512, 1024, 2048, 4096)  # at batch 1
SHAPES = ((8, 1024),)  # batch × length, after the curve
QUICK_LENGTHS = (128, 256)
MODES = ("off", "on")  # activation checkpointing of the curve; a shape's modes may also be a number of blocks


def checkpointing_of(mode: str) -> tuple[bool, int | None]:
    """A point's `checkpointing` → (on, the first how many blocks; None: all): "off", "on" or a block count."""
    return (mode != "off", None if mode in MODES else int(mode))


def mode_label(point: dict[str, Any]) -> str:
    """The checkpointing column: off, on, or the first N blocks (and the limit auto chose them for)."""
    mode = point["checkpointing"]
    if mode in MODES:
        return mode
    limit = point.get("auto_limit_gb")
    return f"first {mode} blocks" + (f" (auto, --memory-limit {limit:g})" if limit is not None else "")


def mode_arg(text: str) -> str:
    """`--shape-modes` item: off, on, a number of blocks, or auto:GB."""
    if text in MODES or text.isdigit() or (text.startswith("auto:") and _positive(text[5:])):
        return text
    raise argparse.ArgumentTypeError(f"{text!r}: expected off, on, a number of blocks or auto:GB, e.g. auto:2.5")


def _positive(text: str) -> bool:
    try:
        return float(text) > 0
    except ValueError:
        return False


def shape_arg(text: str) -> tuple[int, int]:
    """`8x1024` → (8, 1024)."""
    try:
        batch_size, length = (int(part) for part in text.lower().split("x"))
    except ValueError:
        raise argparse.ArgumentTypeError(f"{text!r}: expected BATCHxLENGTH, e.g. 8x1024") from None
    if batch_size < 1 or length < 2:
        raise argparse.ArgumentTypeError(f"{text!r}: batch ≥ 1 and length ≥ 2")
    return batch_size, length


# -- one point, in a fresh process ----------------------------------------------------------------------------
def measure_point(batch_size: int, length: int, mode: str, steps: int) -> dict[str, Any]:
    """Build the lorakit step, switch checkpointing as the training loop does, run `steps` steps on B × T random
    tokens; the peak above the loaded model and the step times."""
    from lorakit.train.checkpointing import enable_checkpointing

    model, step, _ = setups.build("lorakit")  # the lean gated MLPs are on, as in the loop
    own_weights(model)
    checkpointing, blocks = checkpointing_of(mode)
    if checkpointing:
        enable_checkpointing(model, blocks)
    ids = torch.randint(
        3, model.config.vocab_size, (batch_size, length), generator=torch.Generator().manual_seed(length)
    )
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    release_and_reset_peak()
    loaded = status_bytes("VmRSS")
    times = []
    for _ in range(steps):
        begin = time.perf_counter()
        step(batch)
        times.append(time.perf_counter() - begin)
    return {
        "peak_above_model_bytes": status_bytes("VmHWM") - loaded,
        "loaded_bytes": loaded,
        "step_s": statistics.median(times),
        "step_times": times,
        "threads": torch.get_num_threads(),
    }


def estimated_above_model(batch_size: int, length: int, mode: str) -> dict[str, Any]:
    """`lorakit estimate` for the point, above the weights: tensors + runtime, and the total with malloc slack."""
    from lorakit.estimation import CPU_RUNTIME_BYTES, estimate

    checkpointing, blocks = checkpointing_of(mode)
    est = estimate(
        setups.MODEL,
        "lora",
        r=8,
        alpha=16,
        dropout=0.05,
        target_modules=setups.TARGETS,
        batch_size=batch_size,
        max_length=length,
        grad_checkpointing=checkpointing,
        checkpoint_blocks=blocks,
    )
    weights = est.frozen_weight_bytes + est.trainable_weight_bytes
    return {
        "tensors_bytes": est.tensor_peak_bytes + CPU_RUNTIME_BYTES - weights,
        "total_bytes": est.total_bytes - weights,
        "activation_bytes": est.activation_bytes,
        "attention": est.attention,
    }


# -- the run ----------------------------------------------------------------------------------------------------
def auto_blocks(batch_size: int, length: int, limit_gb: float) -> int:
    """The block count `lorakit train --memory-limit limit_gb` checkpoints for this shape: its planner over the
    same estimate (the total with malloc slack, above the weights)."""
    from lorakit.estimation.resolve import resolve_source
    from lorakit.train.checkpointing import blocks_to_checkpoint

    blocks = resolve_source(setups.MODEL).config.num_hidden_layers

    def plan(count: int) -> int:  # none checkpointed is "off", as lorakit train's plan has it (not "on" with 0)
        return estimated_above_model(batch_size, length, str(count) if count else "off")["total_bytes"]

    return blocks_to_checkpoint("auto", blocks, plan, int(limit_gb * 1e9))


def run_point(batch_size: int, length: int, mode: str, steps: int) -> dict[str, Any]:
    """One point: measured in a fresh process (or the reason it failed) beside the estimate. `auto:GB` becomes
    the block count auto takes at that limit."""
    point: dict[str, Any] = {"batch_size": batch_size, "length": length, "steps": steps}
    if mode.startswith("auto:"):
        point["auto_limit_gb"] = float(mode[5:])
        mode = str(auto_blocks(batch_size, length, point["auto_limit_gb"]))
    point["checkpointing"] = mode
    point["estimate"] = estimated_above_model(batch_size, length, mode)
    args = ["--child", str(batch_size), str(length), mode, str(steps)]
    try:
        point["measured"] = run_child(__file__, args, MMAP_THRESHOLD_ENV)
    except ChildFailed as err:
        print(f"{batch_size}×{length} checkpointing {mode}: measurement failed\n{err}", file=sys.stderr)
        point["failed"] = str(err).splitlines()[0]
    return point


def measure_all(points: list[tuple[int, int, int, tuple[str, ...]]], output: Path) -> dict[str, Any]:
    """Every (batch, length, steps, checkpointing modes), mode by mode; the results saved after each point."""
    results: dict[str, Any] = {
        "model": setups.MODEL,
        "lora": {"r": 8, "alpha": 16, "dropout": 0.05, "target_modules": setups.TARGETS},
        "machine": machine(),
        "uptime_before": uptime(),
        "points": [],
    }
    print(header(), flush=True)
    for batch_size, length, steps, modes in points:
        for mode in modes:
            point = run_point(batch_size, length, mode, steps)
            results["points"].append(point)
            print(row_text(point), flush=True)
            results["uptime_after"] = uptime()
            save_json(results, output)
    return results


def save_json(results: dict[str, Any], output: Path) -> None:
    output.parent.mkdir(parents=True, exist_ok=True)
    temporary = output.with_name(output.name + ".tmp")
    temporary.write_text(json.dumps(results, indent=2) + "\n")
    temporary.replace(output)


# -- report -------------------------------------------------------------------------------------------------------
def megabytes(n: float) -> str:
    return f"{n / 1e6:,.0f} MB"


def header() -> str:
    return (
        f"{'B × T':>9s} {'ckpt':>4s} {'measured':>10s} {'estimate':>10s} {'error':>7s} "
        f"{'est+slack':>10s} {'step':>8s}   (MB above the model)"
    )


def row_text(point: dict[str, Any]) -> str:
    shape = f"{point['batch_size']}×{point['length']}"
    est = point["estimate"]
    if "measured" not in point:
        return f"{shape:>9s} {point['checkpointing']:>4s} {'failed':>10s} {megabytes(est['tensors_bytes']):>10s}"
    measured = point["measured"]["peak_above_model_bytes"]
    return (
        f"{shape:>9s} {point['checkpointing']:>4s} {megabytes(measured):>10s} {megabytes(est['tensors_bytes']):>10s} "
        f"{100 * (est['tensors_bytes'] / measured - 1):+6.1f}% {megabytes(est['total_bytes']):>10s} "
        f"{point['measured']['step_s']:7.2f}s"
    )


def markdown(results: dict[str, Any]) -> str:
    """The saved results as a markdown table (the README's "memory-length" table), the step-time ratio of
    checkpointing on/off per shape, the growth per 1,000 tokens along the batch-1 curve, and the machine."""
    lines = [
        "| batch × length | checkpointing | measured above the model | estimated (tensors + runtime) | error "
        "| `lorakit estimate` (with malloc slack) | step (median) |",
        "|---|---|---:|---:|---:|---:|---:|",
    ]
    for point in results["points"]:
        est, measured = point["estimate"], point.get("measured")
        peak = measured["peak_above_model_bytes"] if measured else None
        cells = [
            f"{point['batch_size']} × {point['length']}",
            mode_label(point),
            megabytes(peak) if peak else "failed",
            megabytes(est["tensors_bytes"]),
            f"{100 * (est['tensors_bytes'] / peak - 1):+.1f} %".replace("-", "−") if peak else "–",
            megabytes(est["total_bytes"]),
            f"{measured['step_s']:.2f} s ({point['steps']} steps)" if measured else "–",
        ]
        lines.append("| " + " | ".join(cells) + " |")
    return "\n".join([*lines, "", *summary(results), "", train_step.machine_text(results) + "."])


def with_todays_estimates(results: dict[str, Any]) -> dict[str, Any]:
    """`results` with each point's estimate made again by today's estimator (the measurements stay)."""
    points = [
        {**p, "estimate": estimated_above_model(p["batch_size"], p["length"], p["checkpointing"])}
        for p in results["points"]
    ]
    return {**results, "points": points}


def measured_points(results: dict[str, Any], mode: str, batch_size: int | None = None) -> list[dict[str, Any]]:
    """The measured points with checkpointing `mode` (at `batch_size` if given), in the order run."""
    return [
        p
        for p in results["points"]
        if "measured" in p and p["checkpointing"] == mode and batch_size in (None, p["batch_size"])
    ]


def summary(results: dict[str, Any]) -> list[str]:
    """Each checkpointing mode's step-time cost against off, per shape, and how much each batch-1 step up in length
    adds per 1,000 tokens (constant: memory linear in length; growing with length: a T² term)."""
    off = {(p["batch_size"], p["length"]): p["measured"]["step_s"] for p in measured_points(results, "off")}
    lines = []
    for mode in dict.fromkeys(p["checkpointing"] for p in results["points"] if p["checkpointing"] != "off"):
        ratios = [
            f"{p['batch_size']} × {p['length']} {p['measured']['step_s'] / off[key]:.2f}×"
            for p in measured_points(results, mode)
            if (key := (p["batch_size"], p["length"])) in off
        ]
        name = "on" if mode == "on" else f"of the first {mode} blocks"
        lines.append(f"Step time, checkpointing {name} ÷ off: " + ", ".join(ratios) + "." if ratios else "")
    for mode in MODES:
        curve = measured_points(results, mode, batch_size=1)
        peaks = [(p["length"], p["measured"]["peak_above_model_bytes"]) for p in curve]
        growth = [
            f"{t0}→{t1}: {megabytes(1000 * (m1 - m0) / (t1 - t0))}" for (t0, m0), (t1, m1) in zip(peaks, peaks[1:])
        ]
        if growth:
            lines.append(f"Batch 1, checkpointing {mode}, measured growth per 1,000 tokens: " + ", ".join(growth) + ".")
    return [line for line in lines if line]


def plot(results: dict[str, Any], path: Path) -> None:
    """MB above the model against tokens per step (log 2): measured and estimated, checkpointing off and on;
    the batch-1 curve as lines, other batch sizes as single markers."""
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt
    from matplotlib.ticker import ScalarFormatter

    from lorakit.atomic import atomic_write

    fig, ax = plt.subplots(figsize=(7, 4.2))
    modes = dict.fromkeys(p["checkpointing"] for p in results["points"])
    for mode, colour in zip(modes, ("tab:red", "tab:blue", "tab:green", "tab:purple", "tab:orange")):
        for batch_size in sorted({p["batch_size"] for p in measured_points(results, mode)}):
            points = measured_points(results, mode, batch_size)
            tokens = [p["batch_size"] * p["length"] for p in points]
            style = "-" if batch_size == 1 else ""
            label = f"checkpointing {mode_label(points[0])}" + ("" if batch_size == 1 else f", batch {batch_size}")
            measured = [p["measured"]["peak_above_model_bytes"] / 1e6 for p in points]
            estimated = [p["estimate"]["tensors_bytes"] / 1e6 for p in points]
            ax.plot(tokens, measured, "o" + style, color=colour, label=f"measured, {label}")
            ax.plot(tokens, estimated, "x" + (style and "--"), color=colour, label=f"estimated, {label}")
    ax.set_xscale("log", base=2)
    ax.xaxis.set_major_formatter(ScalarFormatter())  # 256, 512, ... rather than powers of two
    ax.set_xlabel("tokens per step (batch × length)")
    ax.set_ylabel("MB above the loaded model")
    ax.set_title(f"{results['model']}, LoRA r=8 on q,k,v,o, fp32: training memory against length", fontsize=9)
    ax.grid(True, alpha=0.3)
    ax.legend(fontsize=7)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--lengths", type=int, nargs="*", default=list(LENGTHS), help="the batch-1 curve")
    parser.add_argument("--shapes", type=shape_arg, nargs="*", default=list(SHAPES), help="BATCHxLENGTH, after")
    parser.add_argument("--steps", type=int, default=3, help="steps per point of the curve")
    parser.add_argument("--shape-steps", type=int, default=2, help="steps per point of --shapes")
    parser.add_argument(
        "--shape-modes", type=mode_arg, nargs="+", default=list(MODES), help="off, on, N blocks, auto:GB"
    )
    parser.add_argument("--quick", action="store_true", help=f"lengths {QUICK_LENGTHS} at 2 steps, no --shapes")
    parser.add_argument("--output", type=Path, default=JSON_FILE, help="the JSON (the plot goes beside it)")
    parser.add_argument("--report", action="store_true", help="the saved results against today's estimate, replotted")
    parser.add_argument("--child", nargs=4, help=argparse.SUPPRESS)
    args = parser.parse_args()
    if args.child:
        batch_size, length, mode, steps = args.child
        report(measure_point(int(batch_size), int(length), mode, int(steps)))
        return
    if args.quick:
        args.lengths, args.shapes, args.steps = list(QUICK_LENGTHS), [], 2
    if min([args.steps, args.shape_steps]) < 1 or min(args.lengths, default=2) < 2:
        parser.error("--steps and --shape-steps must be ≥ 1, --lengths ≥ 2")
    if args.report:
        results = with_todays_estimates(json.loads(args.output.read_text()))
    else:
        points = [(1, length, args.steps, MODES) for length in args.lengths]
        points += [(batch, length, args.shape_steps, tuple(args.shape_modes)) for batch, length in args.shapes]
        results = measure_all(points, args.output)
    plot_file = args.output.with_suffix(".png")
    plot(results, plot_file)
    print("\n" + markdown(results))
    print(f"written to {plot_file}" if args.report else f"written to {args.output} and {plot_file}")


if __name__ == "__main__":
    main()
