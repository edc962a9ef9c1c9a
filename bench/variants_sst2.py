"""LoRA variants on SST-2 with MiniLM-L6 (CPU): dev accuracy and training time at the same step budget.

Variants (all on query/key/value of the 6 layers, alpha 16, dropout 0.05, the classifier head trained in
full, AdamW lr 1e-3 with 5 % warm-up and linear decay, batch 16, the same steps and data order per seed):

    LoRA      r=8                       scaling alpha/r = 2
    LoRA      r=64                      scaling 0.25 (the reference for rsLoRA at high rank; --no-r64 skips it)
    rsLoRA    r=64                      scaling alpha/sqrt(r) = 2
    LoRA+     r=8, B at 16 × lr
    DoRA      r=8
    PiSSA     r=8                       A, B from the top-8 singular triplets of each W0

Each (seed, variant) run: seed everything, load MiniLM-L6 (the new head's init follows the seed), add the
adapter, train with `lorakit.train.loop.train_adapter`, score the whole SST-2 dev set (872 sentences,
accuracy). Runs are interleaved (seed outer, variant inner) so that changes in the machine's load hit all
variants alike. Torch runs on one thread: on the shared 2-core machine a second intra-op thread mostly waits
for the other one (a step took 5 × longer with 2 threads under a load of 7).

    nice -n 5 .venv/bin/python bench/variants_sst2.py                 # ~15 min at a load average near 2
    .venv/bin/python bench/variants_sst2.py --steps 20 --seeds 0      # a quick look

Writes bench/results/variants_sst2.json and bench/results/variants_sst2.md (the table for docs/results.md).
"""

from __future__ import annotations

import argparse
import copy
import json
import os
import statistics
import sys
import tempfile
import time
from pathlib import Path

import torch

import lorakit
from lorakit.models import load_model
from lorakit.train.data import Collator, encode_classification, load_data
from lorakit.train.evaluate import evaluate_split
from lorakit.train.loop import LoopSettings, train_adapter

from common import cpu_name, load_average

RESULTS = Path(__file__).parent / "results"
TARGETS = ["query", "key", "value"]
VARIANTS = {  # name: (LoraConfig fields, LoRA+ ratio)
    "LoRA r=8": (dict(r=8), None),
    "LoRA r=64": (dict(r=64), None),
    "rsLoRA r=64": (dict(r=64, use_rslora=True), None),
    "LoRA+ r=8 (ratio 16)": (dict(r=8), 16.0),
    "DoRA r=8": (dict(r=8, use_dora=True), None),
    "PiSSA r=8": (dict(r=8, init="pissa"), None),
}


def run_one(variant: str, seed: int, args, train_split, dev_split) -> dict:
    fields, ratio = VARIANTS[variant]
    torch.manual_seed(seed)
    model, tokenizer = load_model("minilm-l6", "seq-cls", num_labels=2)
    config = lorakit.LoraConfig(
        alpha=16, dropout=0.05, target_modules=TARGETS, modules_to_save=["classifier"], **fields
    )
    started = time.perf_counter()
    lorakit.add_adapter(model, config)
    setup_s = time.perf_counter() - started  # PiSSA's SVDs happen here
    trainable, _ = lorakit.trainable_parameters(model)
    features = [encode_classification(tokenizer, e, args.max_length) for e in train_split.examples]
    settings = LoopSettings(
        lr=args.lr,
        max_steps=args.steps,
        batch_size=args.batch_size,
        warmup_ratio=0.05,
        seed=seed,
        loraplus_ratio=ratio,
        save_every=None,
        progress=False,
        log_every=10,
    )
    load_before = load_average()[0]
    with tempfile.TemporaryDirectory() as out:
        result = train_adapter(model, features, Collator(tokenizer.pad_token_id), settings, out)
    model.eval()
    metrics, _ = evaluate_split(model, tokenizer, dev_split, args.max_length, batch_size=32)
    return {
        "variant": variant,
        "seed": seed,
        "accuracy": round(metrics["accuracy"], 2),
        "f1": round(metrics["f1"], 2),
        "mcc": round(metrics["mcc"], 2),
        "final_train_loss": round(result.final_loss, 4),
        "steps": result.steps,
        "train_s": round(result.wall_time_s, 2),
        "s_per_step": round(result.wall_time_s / result.steps, 4),
        "setup_s": round(setup_s, 3),
        "trainable_parameters": trainable,
        "load_average": [load_before, load_average()[0]],
    }


def dora_cost(repetitions: int = 20, seed: int = 0) -> dict:
    """Median time of a training step (forward, backward, AdamW) and of an inference forward on one SST-2
    batch of 16: LoRA r=8 vs DoRA r=8 (unmerged, and merged for inference), measured alternately. DoRA is
    timed with the runs' dropout (0.05) and without: with dropout active its base term needs W0·dropout(x),
    one more base-sized matmul per adapted layer (PEFT's formula), which it can otherwise take from W0·x."""
    torch.manual_seed(seed)
    base, tokenizer = load_model("minilm-l6", "seq-cls", num_labels=2)
    sentences = [e.text for e in load_data("sst2", "train", "seq-cls").examples[:16]]
    batch = tokenizer(sentences, return_tensors="pt", padding=True, truncation=True, max_length=64)
    labels = torch.zeros(16, dtype=torch.long)
    models = {}
    for name, dora, dropout in (
        ("LoRA r=8", False, 0.05),
        ("DoRA r=8", True, 0.05),
        ("DoRA r=8, no dropout", True, 0.0),
    ):
        model = copy.deepcopy(base)
        lorakit.add_adapter(
            model,
            lorakit.LoraConfig(
                r=8, alpha=16, dropout=dropout, target_modules=TARGETS, use_dora=dora, modules_to_save=["classifier"]
            ),
        )
        models[name] = (model, torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-4))
    train: dict[str, list[float]] = {n: [] for n in models}
    infer: dict[str, list[float]] = {n: [] for n in ["LoRA r=8", "DoRA r=8", "DoRA r=8 merged"]}
    for _ in range(repetitions):
        for name, (model, optimizer) in models.items():
            model.train()
            t = time.perf_counter()
            model(**batch, labels=labels).loss.backward()
            optimizer.step()
            optimizer.zero_grad()
            train[name].append(time.perf_counter() - t)
            if name not in infer:
                continue
            model.eval()
            with torch.no_grad():
                t = time.perf_counter()
                model(**batch)
                infer[name].append(time.perf_counter() - t)
                if name == "DoRA r=8":
                    lorakit.merge(model)
                    t = time.perf_counter()
                    model(**batch)
                    infer["DoRA r=8 merged"].append(time.perf_counter() - t)
                    lorakit.unmerge(model)
    return {
        "tokens_per_batch": int(batch["attention_mask"].sum()),
        "train_step_ms": {n: round(1000 * statistics.median(v), 1) for n, v in train.items()},
        "inference_ms": {n: round(1000 * statistics.median(v), 1) for n, v in infer.items()},
    }


def summarise(runs: list[dict], variants: list[str]) -> list[dict]:
    base = [r["s_per_step"] for r in runs if r["variant"] == variants[0]]
    rows = []
    for variant in variants:
        mine = [r for r in runs if r["variant"] == variant]
        acc = [r["accuracy"] for r in mine]
        step = [r["s_per_step"] for r in mine]
        rows.append(
            {
                "variant": variant,
                "trainable_parameters": mine[0]["trainable_parameters"],
                "accuracy_mean": round(statistics.mean(acc), 2),
                "accuracy_std": round(statistics.stdev(acc), 2) if len(acc) > 1 else 0.0,
                "accuracies": acc,
                "train_s_mean": round(statistics.mean(r["train_s"] for r in mine), 1),
                "s_per_step_mean": round(statistics.mean(step), 3),
                "steps_s": step,
                "step_time_vs_first": round(statistics.mean(step) / statistics.mean(base), 2),
                "setup_s_mean": round(statistics.mean(r["setup_s"] for r in mine), 2),
            }
        )
    return rows


def markdown(rows: list[dict], meta: dict) -> str:
    lines = [
        "## LoRA variants on SST-2 (MiniLM-L6, CPU)",
        "",
        f"{meta['steps']} steps of batch {meta['batch_size']} (AdamW, lr {meta['lr']:g}, 5 % warm-up then linear "
        f"decay), LoRA on query/key/value with alpha 16 and dropout 0.05, classifier head trained in full; "
        f"accuracy on the full SST-2 dev set (872 sentences), mean ± sample std over seeds {meta['seeds']}. "
        "Time is the training loop's wall time (no evaluation), one torch thread.",
        "",
        "| variant | trainable params | dev accuracy (%) | per seed | train time / run (s) | s / step "
        "| step time vs LoRA r=8 |",
        "|---|---:|---:|---|---:|---:|---:|",
    ]
    for row in rows:
        lines.append(
            f"| {row['variant']} | {row['trainable_parameters']:,} "
            f"| {row['accuracy_mean']:.2f} ± {row['accuracy_std']:.2f} "
            f"| {', '.join(f'{a:.1f}' for a in row['accuracies'])} | {row['train_s_mean']:.0f} "
            f"| {row['s_per_step_mean']:.3f} "
            f"| {row['step_time_vs_first']:.2f}× |"
        )
    lines += [
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpu']}, {meta['cores']} cores shared with other engineers' jobs; torch {meta['torch']}, "
        f"1 thread. Load average (1 min) before / after: {meta['uptime_before']} / {meta['uptime_after']}; "
        f"total {meta['total_min']:.1f} min.",
        "",
    ]
    cost = meta.get("dora_cost")
    if cost:
        train, infer = cost["train_step_ms"], cost["inference_ms"]
        lora, dora, dora_nd = train["LoRA r=8"], train["DoRA r=8"], train["DoRA r=8, no dropout"]
        lines += [
            "The step times above come from runs interleaved on a machine whose load changed under them "
            f"(the {rows[0]['variant']} runs alone took {min(rows[0]['steps_s']):.2f}–{max(rows[0]['steps_s']):.2f} s "
            "per step); LoRA+ does exactly LoRA's arithmetic, so its ratio is noise, and so is most of PiSSA's "
            "(its extra frozen s·B0·A0·x term is as small as the adapter). "
            "DoRA's cost measured on its own (`dora_cost` in the script: median of 20 alternating repetitions "
            f"on one batch of 16 sentences, {cost['tokens_per_batch']} tokens; load average "
            f"{' '.join(map(str, meta.get('dora_cost_load_average', ['?'])))}):",
            "",
            "| | LoRA r=8 | DoRA r=8 | DoRA / LoRA |",
            "|---|---:|---:|---:|",
            f"| training step, dropout 0.05 (ms) | {lora} | {dora} | {dora / lora:.2f}× |",
            f"| training step, DoRA without dropout (ms) | {lora} | {dora_nd} | {dora_nd / lora:.2f}× |",
            f"| inference forward, unmerged (ms) | {infer['LoRA r=8']} | {infer['DoRA r=8']} "
            f"| {infer['DoRA r=8'] / infer['LoRA r=8']:.2f}× |",
            f"| inference forward, DoRA merged (ms) | {infer['LoRA r=8']} | {infer['DoRA r=8 merged']} "
            f"| {infer['DoRA r=8 merged'] / infer['LoRA r=8']:.2f}× |",
            "",
            "With dropout active, DoRA's base term is W0·dropout(x) (PEFT's formula), one more base-sized matmul "
            "(and its backward) per adapted layer; without dropout, or in evaluation, it reuses the base layer's "
            "output and costs only the per-row norms of W0 + s·B·A. Merged, DoRA runs exactly as fast as the base.",
            "",
        ]
    return "\n".join(lines)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--batch-size", type=int, default=16)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--max-length", type=int, default=64)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1, 2])
    parser.add_argument("--no-r64", action="store_true", help="skip the plain LoRA r=64 reference")
    parser.add_argument("--output", type=Path, default=RESULTS / "variants_sst2.json")
    parser.add_argument(
        "--cost-only",
        action="store_true",
        help="keep the runs in --output, measure DoRA's cost again and rewrite the tables",
    )
    args = parser.parse_args()
    torch.set_num_threads(1)
    if args.cost_only:
        saved = json.loads(args.output.read_text())
        saved["meta"]["dora_cost"] = dora_cost()
        saved["meta"]["dora_cost_load_average"] = load_average()
        variants = [row["variant"] for row in saved["summary"]]
        saved["summary"] = summarise(saved["runs"], variants)
        args.output.write_text(json.dumps(saved, indent=2))
        text = markdown(saved["summary"], saved["meta"])
        args.output.with_suffix(".md").write_text(text)
        print(text)
        return
    variants = [v for v in VARIANTS if not (args.no_r64 and v == "LoRA r=64")]

    train_split = load_data("sst2", "train", "seq-cls")
    dev_split = load_data("sst2", "validation", "seq-cls")
    uptime_before = load_average()
    begin = time.perf_counter()
    runs = []
    for seed in args.seeds:
        for variant in variants:
            run = run_one(variant, seed, args, train_split, dev_split)
            runs.append(run)
            print(
                f"seed {seed} {variant:22s} acc {run['accuracy']:.2f}  {run['s_per_step']:.3f} s/step  "
                f"load {run['load_average']}",
                flush=True,
            )
    meta = {
        "command": " ".join(["nice -n 5" if os.nice(0) > 0 else "", ".venv/bin/python", *sys.argv]).strip(),
        "steps": args.steps,
        "batch_size": args.batch_size,
        "lr": args.lr,
        "max_length": args.max_length,
        "seeds": args.seeds,
        "cpu": cpu_name(),
        "cores": os.cpu_count(),
        "torch": torch.__version__,
        "uptime_before": " ".join(map(str, uptime_before)),
        "uptime_after": " ".join(map(str, load_average())),
        "total_min": (time.perf_counter() - begin) / 60,
    }
    meta["dora_cost"] = dora_cost()
    meta["dora_cost_load_average"] = load_average()
    rows = summarise(runs, variants)
    args.output.parent.mkdir(parents=True, exist_ok=True)
    args.output.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=2))
    text = markdown(rows, meta)
    args.output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
