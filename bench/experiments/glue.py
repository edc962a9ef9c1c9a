"""Experiment 1 of issue 6, the LoRA paper's Table 2 at small scale: every fine-tuning method of `lorakit train
--method` on MiniLM-L6 (all-MiniLM-L6-v2, 22.7M parameters) for SST-2 and MRPC, scored on the full GLUE dev
sets (872 sentences, 408 pairs): accuracy (MRPC also F1), mean ± std over seeds, trainable parameters, and
what each method costs: checkpoint size, memory while training, inference latency.

Every run does what `lorakit train --model minilm-l6 --data sst2 --method X` does, with the library's own
pieces (load_model, apply_method or add_adapter, train_adapter, evaluate_split, lorakit.methods.measure),
leaving out what the table does not need and the CPU budget cannot pay for (scoring the untrained model,
periodic checkpoints, prediction files): the same steps and batch for every method (AdamW, 6 % warm-up then
linear decay, gradient clipping 1.0), its own learning rate (LR below, not tuned here), the classification
head trained in full with every method (with `full` everything trains). Training data: lorakit's samples of the training
sets (2,000 of SST-2's 67,349 sentences, 2,000 of MRPC's 3,668 pairs), read in a seeded order. Runs go
seed-major (every task and method at seed 0, then seed 1, ...), so that changes in the shared machine's
load hit all methods alike. Torch runs on one thread (a second one mostly waits on 2 shared cores).

    nice -n 10 .venv/bin/python bench/experiments/glue.py                      # the committed table
    nice -n 10 .venv/bin/python bench/experiments/glue.py --memory-only        # re-measure its memory column
    .venv/bin/python bench/experiments/glue.py --table-only                    # rewrite the tables from the JSON
    .venv/bin/python bench/experiments/glue.py --steps 10 --seeds 0 --tasks sst2 --results /tmp/glue

Writes <results>/glue_methods.json and .md and, for the default results folder, the "methods-glue" section
of docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import json
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.methods import MethodOptions
from lorakit.models import load_model
from lorakit.train.data import Collator, encode_classification, load_data
from lorakit.train.evaluate import evaluate_split
from lorakit.train.loop import LoopSettings

from methods_runs import RESULTS, fine_tune, mean_std, timed, update_docs_section, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py; a script's path has its folder only
from common import cpu_name, load_average, machine_line  # noqa: E402

METHODS = ["full", "bitfit", "head", "adapter", "prefix", "prompt", "lora"]
# Raised for a short budget after a 50-step pilot at full 1e-4 / head, prefix, prompt 1e-2 / the rest 1e-3, in
# which every method at 1e-3 was still at chance level on SST-2; not tuned beyond that.
LR = {"full": 1e-4, "bitfit": 5e-3, "head": 1e-2, "adapter": 3e-3, "prefix": 1e-2, "prompt": 3e-2, "lora": 3e-3}
LABEL = {
    "full": "full fine-tuning",
    "bitfit": "BitFit",
    "head": "linear probe (head only)",
    "adapter": "adapter (Houlsby, k=16)",
    "prefix": "prefix (P=10)",
    "prompt": "prompt (n=10)",
    "lora": "LoRA (q,v, r=8)",
}
TASKS = ["sst2", "mrpc"]
DEFAULT_STEPS = 100


def prepare(task: str, tokenizer, max_length: int) -> dict:
    """The task's training features (the sample), its dev split, and the fixed latency batch."""
    train, dev = load_data(task, "train"), load_data(task, "validation")
    collate = Collator(tokenizer.pad_token_id)
    dev_features = [encode_classification(tokenizer, e, max_length) for e in dev.examples[:16]]
    # Scored in order of length: batches pad less, and accuracy does not depend on the order.
    dev = dataclasses.replace(dev, examples=sorted(dev.examples, key=lambda e: len(e.text) + len(e.text_pair or "")))
    return {
        "features": [encode_classification(tokenizer, e, max_length) for e in train.examples],
        "dev": dev,
        "collate": collate,
        "latency_batch": collate(dev_features),
    }


def run_one(task: str, method: str, seed: int, data: dict, args) -> dict:
    def work() -> dict:
        random.seed(seed)
        torch.manual_seed(seed)  # the new head's initialisation and the method's follow the seed
        model, tokenizer = load_model("minilm-l6", "seq-cls", num_labels=2)
        settings = LoopSettings(
            lr=LR[method],
            max_steps=args.steps,
            batch_size=args.batch_size,
            warmup_ratio=0.06,
            seed=seed,
            save_every=None,
            progress=False,
            log_every=10,
        )
        lora = lorakit.LoraConfig(
            r=8, alpha=16, dropout=0.05, target_modules=["query", "value"], modules_to_save=["classifier"]
        )
        options = MethodOptions(adapter_size=16, prefix_length=10, prompt_length=10)

        def score(m) -> dict:  # the --memory-only pass trains without scoring
            return {} if args.memory_only else evaluate_split(m, tokenizer, data["dev"], args.max_length)[0]

        return fine_tune(
            model, method, data["features"], data["collate"], settings, data["latency_batch"], lora, options, score
        )

    run = {"task": task, "method": method, "seed": seed, **timed(work)}
    scores = ", ".join(f"{k} {run['after'][k]:.1f}" for k in ("accuracy", "f1") if k in run["after"])
    print(
        f"{task} {method} seed {seed}: {scores}, loss {run['final_loss']:.3f}, "
        f"memory +{run['rss_growth_mb']:.0f} MB; {run['job_wall_s']:.0f}s ({run['job_cpu_s']:.0f} CPU-s), "
        f"load {load_average()[0]}",
        flush=True,
    )
    return run


def summarise(runs: list[dict], memory_runs: list[dict]) -> dict[str, dict]:
    """Per method: scores by task, and medians of the costs (training memory from `memory_runs` when given)."""
    rows: dict[str, dict] = {}
    for method in METHODS:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        row = {"trainable_parameters": mine[0]["trainable_parameters"], "total_parameters": mine[0]["total_parameters"]}
        for task in TASKS:
            done = [r for r in mine if r["task"] == task]
            row[task] = {
                "seeds": [r["seed"] for r in done],
                "accuracy": [r["after"]["accuracy"] for r in done],
                "f1": [r["after"]["f1"] for r in done],
            }
        row["checkpoint_mb"] = statistics.mean(r["checkpoint_mb"] for r in mine)
        measured = [r for r in memory_runs if r["method"] == method] or mine
        row["rss_growth_mb"] = {
            task: statistics.median(r["rss_growth_mb"] for r in measured if r["task"] == task)
            for task in TASKS
            if any(r["task"] == task for r in measured)
        }
        row["s_per_step"] = statistics.median(r["wall_time_s"] / r["steps"] for r in mine)
        row["latency_ratio"] = statistics.median(r["latency_ms"][method] / r["latency_ms"]["base"] for r in mine)
        if method == "lora":
            row["merged_latency_ratio"] = statistics.median(
                r["latency_ms"]["lora_merged"] / r["latency_ms"]["base"] for r in mine
            )
        rows[method] = row
    return rows


def markdown(rows: dict[str, dict], meta: dict) -> str:
    seeds = ", ".join(str(s) for s in meta["seeds"])
    command = "" if meta["steps"] == DEFAULT_STEPS else f" --steps {meta['steps']}"
    memory_note = (
        "measured in a separate pass (`--memory-only`: seed 0 of every task and method, the same "
        "steps, no scoring; freed memory returned to the system before each run)"
        if meta.get("memory_pass")
        else "median over runs"
    )
    lines = [
        "## Fine-tuning methods on GLUE (MiniLM-L6, CPU): the LoRA paper's Table 2 at small scale",
        "",
        f"{meta['steps']} steps of batch {meta['batch_size']} per run (AdamW, 6 % warm-up then linear decay, "
        f"gradient clipping 1.0), every method the same budget with its own learning rate "
        f"({', '.join(f'{m} {LR[m]:g}' for m in METHODS)}: raised for this short budget after a 50-step pilot in "
        "which the methods at 1e-3 were still at chance level; not tuned further). **Training data subsampled**: "
        "lorakit's "
        "2,000-example samples of the SST-2 and MRPC training sets "
        f"({meta['steps'] * meta['batch_size']:,} examples seen per run). Scores on the full GLUE dev sets "
        f"(SST-2 872 sentences, MRPC 408 pairs), mean ± sample std over seeds {seeds}; the classification head "
        "trains in full with every method. Trainable parameters are for SST-2 (two classes; the same for MRPC).",
        "",
        "| method | trainable params | % of model | SST-2 acc (%) | MRPC acc (%) | MRPC F1 (%) | checkpoint (MB) "
        "| training memory, SST-2 / MRPC (MB) | forward latency vs base | s / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method, row in rows.items():
        latency = f"{row['latency_ratio']:.2f}×"
        if "merged_latency_ratio" in row:
            latency += f" (merged {row['merged_latency_ratio']:.2f}×)"
        lines.append(
            f"| {LABEL[method]} | {row['trainable_parameters']:,} | "
            f"{100 * row['trainable_parameters'] / row['total_parameters']:.3g} | "
            f"{mean_std(row['sst2']['accuracy'])} | {mean_std(row['mrpc']['accuracy'])} | "
            f"{mean_std(row['mrpc']['f1'])} | {row['checkpoint_mb']:.3g} | "
            f"{' / '.join(f'{v:.0f}' for v in row['rss_growth_mb'].values())} | "
            f"{latency} | {row['s_per_step']:.2f} |"
        )
    lines += [
        "",
        "Checkpoint: the method's saved weights (LoRA: PEFT's adapter file; full: the whole model). Training "
        f"memory: the largest growth of the process's resident memory while training, above what it held "
        f"before (weights are loaded already; gradients, optimizer state and activations count), {memory_note}. "
        "Latency: one forward pass on a fixed batch of 16 dev examples, median of 5, divided by the "
        "base model's on the same batch in the same run, median over runs; merged LoRA folds B·A into the "
        "weights.",
        "",
        f"Command: `nice -n 10 .venv/bin/python bench/experiments/glue.py{command}`"
        + (", then the same with `--memory-only`  " if meta.get("memory_pass") else "  "),
        machine_line(meta)
        + (
            f" Memory pass: load {' '.join(map(str, memory['load_before']))} / "
            f"{' '.join(map(str, memory['load_after']))}, {memory['cpu_minutes']:.1f} CPU-min."
            if (memory := meta.get("memory_pass"))
            else ""
        ),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--max-length", type=int, default=128)
    parser.add_argument("--seeds", default="0,1,2")
    parser.add_argument("--tasks", default=",".join(TASKS))
    parser.add_argument("--methods", default=",".join(METHODS))
    parser.add_argument("--results", type=Path, default=RESULTS)
    parser.add_argument(
        "--memory-only",
        action="store_true",
        help="measure training memory again (first seed, no scoring) into the existing results",
    )
    parser.add_argument("--table-only", action="store_true", help="rewrite the tables from the existing results")
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    tasks, methods = args.tasks.split(","), args.methods.split(",")
    torch.set_num_threads(1)
    meta = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "max_length": args.max_length,
        "seeds": seeds,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "load_before": load_average(),
    }
    started, cpu = time.perf_counter(), time.process_time()
    if args.table_only:
        saved = json.loads((args.results / "glue_methods.json").read_text())
        runs, memory_runs, meta = saved["runs"], saved.get("memory_runs", []), saved["meta"]
    else:
        _, tokenizer = load_model("minilm-l6", "seq-cls", num_labels=2)
        data = {task: prepare(task, tokenizer, args.max_length) for task in tasks}
        if args.memory_only:
            saved = json.loads((args.results / "glue_methods.json").read_text())
            memory_runs = [run_one(task, method, seeds[0], data[task], args) for task in tasks for method in methods]
            runs, meta = (
                saved["runs"],
                {
                    **saved["meta"],
                    "memory_pass": {
                        "load_before": meta["load_before"],
                        "load_after": load_average(),
                        "cpu_minutes": (time.process_time() - cpu) / 60,
                    },
                },
            )
        else:
            runs = [
                run_one(task, method, seed, data[task], args) for seed in seeds for task in tasks for method in methods
            ]
            memory_runs = []
            meta.update(
                load_after=load_average(),
                minutes=(time.perf_counter() - started) / 60,
                cpu_minutes=(time.process_time() - cpu) / 60,
            )
    rows = summarise(runs, memory_runs)
    table = markdown(rows, meta)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(
        args.results / "glue_methods.json",
        {"meta": meta, "lr": LR, "rows": rows, "runs": runs, "memory_runs": memory_runs},
    )
    (args.results / "glue_methods.md").write_text(table)
    if args.results.resolve() == RESULTS.resolve():
        update_docs_section("methods-glue", table)
    print(table)


if __name__ == "__main__":
    main()
