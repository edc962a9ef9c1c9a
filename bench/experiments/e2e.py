"""Experiment 2 of issue 6, the LoRA paper's Table 3 at small scale: SmolLM2-135M-Instruct on E2E NLG, the base
model prompted zero-shot (lorakit's instruction + the meaning representation, in the chat template) against
LoRA, full fine-tuning, Houlsby adapters and prefix tuning, all trained the same number of steps.

Every run does what `lorakit train --data e2e --method X` does, with the library's pieces (see methods_runs.py):
the loss on the target tokens only, AdamW with 6 % warm-up then linear decay, gradient clipping 1.0, each
method with its own learning rate (LR below, not tuned). Scores: BLEU, NIST, chrF and ROUGE-L
(lorakit.train.metrics: sacrebleu / nltk / rouge-score) of greedy outputs on the first --eval-examples
meaning representations of the E2E test set, each against all of its references. METEOR needs nltk's WordNet
data and CIDEr pycocoevalcap, neither installed offline here: left out.

    nice -n 10 .venv/bin/python bench/experiments/e2e.py                        # minutes per run
    .venv/bin/python bench/experiments/e2e.py --steps 5 --eval-examples 4 --methods lora --results /tmp/e2e

Training data: lorakit's E2E sample (1,000 of 42,061 training rows; `--data e2e-full` reads the complete set
from $LORAKIT_DATA), the first --train-examples of it. Writes <results>/e2e_methods.json and .md and, for the
default results folder, the "methods-e2e" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import dataclasses
import random
import statistics
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.methods import MethodOptions
from lorakit.methods.measure import forward_latency_ms
from lorakit.models import BUILTIN_MODELS, load_model
from lorakit.train.data import Collator, encode_causal, load_data
from lorakit.train.evaluate import evaluate_split
from lorakit.train.loop import LoopSettings

from methods_runs import RESULTS, fine_tune, mean_std, timed, update_docs_section, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py; a script's path has its folder only
from common import cpu_name, load_average, machine_line  # noqa: E402

MODEL = "smollm2-135m"
METHODS = ["lora", "full", "adapter", "prefix"]
LR = {"lora": 1e-3, "full": 5e-5, "adapter": 1e-3, "prefix": 5e-3}
LABEL = {
    "base": "base model, zero-shot prompt",
    "lora": "LoRA (q,k,v,o, r=8)",
    "full": "full fine-tuning",
    "adapter": "adapter (Houlsby, k=16)",
    "prefix": "prefix (P=10)",
}
METRICS = ("bleu", "nist", "chrf", "rouge_l")
DEFAULT_STEPS = 200


def prepare(args, tokenizer) -> dict:
    train = load_data(args.data, "train")
    scored = load_data(args.data, "test")
    scored = dataclasses.replace(scored, examples=scored.examples[: args.eval_examples])
    features = [encode_causal(tokenizer, e, args.max_length) for e in train.examples[: args.train_examples]]
    collate = Collator(tokenizer.pad_token_id)
    return {
        "features": features,
        "scored": scored,
        "collate": collate,
        "latency_batch": collate(features[: args.batch_size]),
    }


def score(model, tokenizer, data: dict, args) -> dict[str, float]:
    return evaluate_split(model, tokenizer, data["scored"], args.max_length, args.max_new_tokens)[0]


def run_one(method: str, seed: int, data: dict, args) -> dict:
    def work() -> dict:
        random.seed(seed)
        torch.manual_seed(seed)
        model, tokenizer = load_model(MODEL, "causal-lm")
        if method == "base":
            return {
                "after": score(model, tokenizer, data, args),
                "latency_ms": {"base": forward_latency_ms(model, data["latency_batch"])},
            }
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
        targets = list(BUILTIN_MODELS[MODEL].target_modules)
        lora = lorakit.LoraConfig(r=8, alpha=16, dropout=0.05, target_modules=targets)
        options = MethodOptions(adapter_size=16, prefix_length=10)
        return fine_tune(
            model,
            method,
            data["features"],
            data["collate"],
            settings,
            data["latency_batch"],
            lora,
            options,
            lambda m: score(m, tokenizer, data, args),
        )

    run = {"method": method, "seed": seed, **timed(work)}
    print(
        f"{method} seed {seed}: "
        + ", ".join(f"{k} {run['after'][k]:.2f}" for k in METRICS)
        + f"; {run['job_wall_s']:.0f}s ({run['job_cpu_s']:.0f} CPU-s), load {load_average()[0]}",
        flush=True,
    )
    return run


def _latency_ratio(runs: list[dict], key: str) -> float:
    """Median over `runs` of the forward latency under `key` relative to the base model's."""
    return statistics.median(run["latency_ms"][key] / run["latency_ms"]["base"] for run in runs)


def markdown(runs: list[dict], meta: dict) -> str:
    seeds = ", ".join(str(s) for s in meta["seeds"])
    lines = [
        "## Fine-tuning methods on E2E NLG (SmolLM2-135M-Instruct, CPU): the LoRA paper's Table 3 at small scale",
        "",
        f"{meta['steps']} steps of batch {meta['batch_size']} per trained row (AdamW, 6 % warm-up then linear decay, "
        f"gradient clipping 1.0, loss on the target tokens), each method with its own learning rate "
        f"({', '.join(f'{m} {LR[m]:g}' for m in METHODS)}; not tuned). **Subsampled**: training on the first "
        f"{meta['train_examples']:,} rows of {meta['data']!r}; scored on the first {meta['eval_examples']} meaning "
        f"representations of the E2E test set (each against all its references), greedy decoding of at most "
        f"{meta['max_new_tokens']} tokens; mean ± std over seeds {seeds}. METEOR and CIDEr: no offline package.",
        "",
        "| method | trainable params | BLEU | NIST | chrF | ROUGE-L | checkpoint (MB) | training memory (MB) "
        "| forward latency vs base | s / step |",
        "|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for method in ["base", *METHODS]:
        mine = [r for r in runs if r["method"] == method]
        if not mine:
            continue
        scores = " | ".join(mean_std([r["after"][k] for r in mine], digits=2) for k in METRICS)
        if method == "base":
            lines.append(f"| {LABEL[method]} | 0 | {scores} | – | – | 1.00× | – |")
            continue
        first = mine[0]
        latency = f"{_latency_ratio(mine, method):.2f}×"
        if method == "lora":
            latency += f" (merged {_latency_ratio(mine, 'lora_merged'):.2f}×)"
        share = 100 * first["trainable_parameters"] / first["total_parameters"]
        lines.append(
            f"| {LABEL[method]} | {first['trainable_parameters']:,} ({share:.3g} %) | {scores} | "
            f"{first['checkpoint_mb']:.3g} | {statistics.median(r['rss_growth_mb'] for r in mine):.0f} | {latency} | "
            f"{statistics.median(r['wall_time_s'] / r['steps'] for r in mine):.2f} |"
        )
    lines += [
        "",
        "Columns after the scores as in the GLUE table above (training memory: growth of resident memory while "
        "training; latency: one forward pass on a fixed batch of training rows against the base model's).",
        "",
        f"Command: `nice -n 10 .venv/bin/python bench/experiments/e2e.py{meta['command']}`  ",
        machine_line(meta),
    ]
    return "\n".join(lines) + "\n"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("--steps", type=int, default=DEFAULT_STEPS)
    parser.add_argument("--batch-size", type=int, default=8)
    parser.add_argument("--max-length", type=int, default=256)
    parser.add_argument("--train-examples", type=int, default=1000)
    parser.add_argument("--eval-examples", type=int, default=100)
    parser.add_argument("--max-new-tokens", type=int, default=64)
    parser.add_argument("--data", default="e2e")
    parser.add_argument("--seeds", default="0")
    parser.add_argument("--methods", default=",".join(["base", *METHODS]))
    parser.add_argument("--results", type=Path, default=RESULTS)
    args = parser.parse_args()
    seeds = [int(s) for s in args.seeds.split(",")]
    methods = args.methods.split(",")
    torch.set_num_threads(1)
    given = {k: v for k, v in vars(args).items() if k not in ("results", "methods") and v != parser.get_default(k)}
    meta = {
        "steps": args.steps,
        "batch_size": args.batch_size,
        "train_examples": args.train_examples,
        "eval_examples": args.eval_examples,
        "max_new_tokens": args.max_new_tokens,
        "data": args.data,
        "seeds": seeds,
        "cpu": cpu_name(),
        "torch": torch.__version__,
        "load_before": load_average(),
        "command": "".join(f" --{k.replace('_', '-')} {v}" for k, v in given.items()),
    }
    started, cpu = time.perf_counter(), time.process_time()
    _, tokenizer = load_model(MODEL, "causal-lm")
    data = prepare(args, tokenizer)
    # The base model's greedy outputs do not depend on the seed: scored once.
    runs = [run_one(m, seed, data, args) for seed in seeds for m in methods if m != "base" or seed == seeds[0]]
    meta.update(
        load_after=load_average(),
        minutes=(time.perf_counter() - started) / 60,
        cpu_minutes=(time.process_time() - cpu) / 60,
    )
    table = markdown(runs, meta)
    args.results.mkdir(parents=True, exist_ok=True)
    write_json(args.results / "e2e_methods.json", {"meta": meta, "lr": LR, "runs": runs})
    (args.results / "e2e_methods.md").write_text(table)
    if args.results.resolve() == RESULTS.resolve():
        update_docs_section("methods-e2e", table)
    print(table)


if __name__ == "__main__":
    main()
