"""Experiment 3 of issue 6, the LoRA paper's Tables 5–7 and Figures 3–4 at small scale: which weight
matrices to adapt, which rank suffices, and how the trained ΔW relates to W. MiniLM-L6 on SST-2 (CPU).

Runs (each: `lorakit.train.run.run_training`, i.e. `lorakit train --data sst2 --model minilm-l6 ...`):

- same budget of 36,864 LoRA parameters (6 layers × r × (384 + 384) per matrix): {q} r=8, {k} r=8,
  {v} r=8, {q,v} r=4, {q,k,v,o} r=2 (the paper's Table 5);
- r ∈ {1, 2, 4, 8, 64} on {q} and on {q,v} (Table 6).

All with alpha 16 for every r (as the paper, α is not tuned per r), dropout 0.05, AdamW lr 1e-3 with 5 %
warm-up then linear decay, batch 16, the classifier head trained in full; training on lorakit's 2,000-sentence
SST-2 sample (of 67,349), accuracy on the full dev set (872). The four runs the analysis reads go first, then
seed-major order (every config at seed 0, then seed 1, ...); no run starts that would end (at the mean run
time so far) after --max-minutes, so the table says which seeds each row has.

Then the analysis (`lorakit.analyze_adapter`) of the adapters it keeps in runs/rank_study/: φ between the
{q,v} r=8 and r=64 adapters (Figure 3) and between two seeds of {q,v} r=64 (Figure 4), and ΔW vs W for
{q,v} r=4, 8, 64 (Table 7), for a middle layer (3 of 0–5) and per layer.

    nice -n 10 .venv/bin/python bench/experiments/rank_study.py                  # ~20 min on 2 shared cores
    .venv/bin/python bench/experiments/rank_study.py --steps 5 --seeds 0 --only qv-r8,qv-r64 --results /tmp/rs
    .venv/bin/python bench/experiments/rank_study.py --analyze-only              # redo the analysis and tables

Writes bench/results/rank_study.json and .md, bench/results/rank_study_*.png, and the `lorakit analyze`
outputs (the full per-layer reports) beside the adapters in runs/rank_study/analysis/.
"""

from __future__ import annotations

import argparse
import json
import os
import statistics
import sys
import time
from pathlib import Path

import torch

import lorakit
from lorakit.analysis import write_report
from lorakit.analysis.plots import plot_similarity, plot_spectra
from lorakit.train.run import RunConfig, run_training

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py; a script's path has its folder only
from common import cpu_name, load_average  # noqa: E402

ROOT = Path(__file__).resolve().parents[2]
RESULTS = ROOT / "bench" / "results"
ADAPTERS = ROOT / "runs" / "rank_study"  # the kept adapters (git-ignored)
MODULES = {"q": "query", "k": "key", "v": "value", "o": "attention.output.dense"}
BUDGET = [("q", 8), ("k", 8), ("v", 8), ("qv", 4), ("qkvo", 2)]
RANKS = [1, 2, 4, 8, 64]
RANK_SETS = ["q", "qv"]
MIDDLE = 3  # of layers 0–5
KEPT = {"qv-r4", "qv-r8", "qv-r64"}  # configs whose ΔW vs W the analysis reports (seed 0)
ANALYSED = [("qv-r8", 0), ("qv-r64", 0), ("qv-r64", 1), ("qv-r4", 0)]  # (config, seed) runs the analysis reads
ALPHA = 16.0


def config_names() -> list[str]:
    names = [f"{t}-r{r}" for t, r in BUDGET] + [f"{t}-r{r}" for t in RANK_SETS for r in RANKS]
    return list(dict.fromkeys(names))


def parse(name: str) -> tuple[str, int]:
    targets, r = name.split("-r")
    return targets, int(r)


def label(targets: str) -> str:
    return "{" + ",".join(targets) + "}"


def run_one(name: str, seed: int, args) -> dict:
    targets, r = parse(name)
    out = args.adapters / f"{name}-s{seed}"
    cfg = RunConfig(
        model="minilm-l6",
        data="sst2",
        target_modules=[MODULES[t] for t in targets],
        r=r,
        alpha=ALPHA,
        dropout=0.05,
        lr=args.lr,
        max_steps=args.steps,
        batch_size=16,
        max_length=64,
        seed=seed,
        output=str(out),
        eval_examples=None,
        val_examples=16,
        eval_every=None,
        save_every=None,
        progress=False,
        overwrite=True,
    )
    load_before = load_average()
    started = time.perf_counter()
    summary = run_training(cfg, log=lambda message: None)
    return {
        "config": name,
        "targets": label(targets),
        "r": r,
        "seed": seed,
        "accuracy": round(summary["after"]["accuracy"], 2),
        "accuracy_before": round(summary["before"]["accuracy"], 2),
        "trainable_parameters": summary["train"]["trainable_parameters"],
        "final_train_loss": round(summary["train"]["final_loss"], 4),
        "steps": summary["train"]["steps"],
        "train_s": summary["train"]["wall_time_s"],
        "run_s": round(time.perf_counter() - started, 1),
        "load_average": [load_before, load_average()],
        "adapter": _relative(out),
    }


def _relative(path: Path) -> str:
    """The path from the repository root when it is inside it (so the JSON is portable), else absolute."""
    path = path.resolve()
    return str(path.relative_to(ROOT)) if path.is_relative_to(ROOT) else str(path)


def summarise(runs: list[dict]) -> dict[str, dict]:
    rows = {}
    for name in config_names():
        mine = [run for run in runs if run["config"] == name]
        if not mine:
            continue
        acc = [run["accuracy"] for run in mine]
        targets, r = parse(name)
        rows[name] = {
            "targets": label(targets),
            "r": r,
            "trainable_parameters": mine[0]["trainable_parameters"],
            "lora_parameters": 6 * r * (384 + 384) * len(targets),
            "seeds": [run["seed"] for run in mine],
            "accuracies": acc,
            "accuracy_mean": round(statistics.mean(acc), 2),
            "accuracy_std": round(statistics.stdev(acc), 2) if len(acc) > 1 else None,
        }
    return rows


# -- analysis ---------------------------------------------------------------------------------------
def _middle(rows: list[dict], kind_end: str) -> dict:
    return next(row for row in rows if row["layer"] == MIDDLE and row["kind"].endswith(kind_end))


def analyse(base, runs: list[dict], results: Path) -> dict:
    """φ(r=8, r=64), φ(seed 0, seed 1) at r=64, and ΔW vs W for {q,v} r=4, 8, 64 (seed 0)."""
    done = {(run["config"], run["seed"]) for run in runs}
    adapters = {(run["config"], run["seed"]): ROOT / run["adapter"] for run in runs}
    analysis: dict = {"middle_layer": MIDDLE, "table7": {}, "per_layer": {}}
    spectra: dict[int, list[dict]] = {}
    for name in sorted(KEPT, key=lambda n: parse(n)[1]):
        if (name, 0) not in done:
            continue
        report = lorakit.analyze_adapter(adapters[name, 0], model=base)
        r = parse(name)[1]
        analysis["table7"][r] = {
            kind: {
                k: _middle(report["layers"], kind)[k]
                for k in (
                    "projection_delta",
                    "projection_weight",
                    "projection_random",
                    "weight_norm",
                    "delta_norm",
                    "amplification",
                    "effective_rank",
                    "energy_rank",
                )
            }
            for kind in ("query", "value")
        }
        spectra[r] = report["layers"]
        kept = ("kind", "layer", "relative_norm", "effective_rank", "energy_rank", "amplification")
        analysis["per_layer"][r] = [{k: row[k] for k in kept} for row in report["layers"]]
    if spectra:
        groups = {
            f"{kind}, r={r}": [
                (f"layer {row['layer']}", row["singular_values"]) for row in rows if row["kind"].endswith(kind)
            ]
            for kind in ("query", "value")
            for r, rows in spectra.items()
        }
        plot_spectra(groups, results / "rank_study_spectrum.png", "singular values of ΔW, {q,v} adapters of seed 0")
    pairs = {"r8_vs_r64": (("qv-r8", 0), ("qv-r64", 0)), "r64_seed0_vs_seed1": (("qv-r64", 0), ("qv-r64", 1))}
    for key, (first, second) in pairs.items():
        if first not in done or second not in done:
            continue
        for factor in ("A", "B"):  # input side (the paper's figures), and output side
            report = lorakit.analyze_adapter(
                adapters[first],
                model=base if factor == "A" else None,
                compare=adapters[second],
                factor=factor,
                with_base=factor == "A",
            )
            if factor == "A":  # the full `lorakit analyze` output (large JSON): beside the adapters, not committed
                write_report(report, adapters[first].parent / "analysis" / key)
            rows = report["comparison"]["layers"]
            kept = ("kind", "layer", "r1", "r2", "dim", "phi_1_1", "phi_k_k", "phi_r1_r2", "random_r1_r2")
            analysis[f"{key}_{factor}"] = [{k: row[k] for k in kept} | {"phi_1_r2": row["phi"][0][-1]} for row in rows]
            plot_similarity(*_figure(key, factor, rows, results), columns=2)
    return analysis


def _figure(key: str, factor: str, rows: list[dict], results: Path) -> tuple:
    """The paper's Figure 3 (r=8 vs r=64: all j, and j ≤ 8) or Figure 4 (two seeds) for the middle layer."""
    panels = [(f"{kind} · layer {MIDDLE}", _middle(rows, kind)["phi"]) for kind in ("query", "value")]
    name = f"rank_study_{key}_{factor}.png"
    if key == "r8_vs_r64":
        panels = [
            panels[0],
            (panels[0][0] + ", j ≤ 8", [line[:8] for line in panels[0][1]]),
            panels[1],
            (panels[1][0] + ", j ≤ 8", [line[:8] for line in panels[1][1]]),
        ]
        title = f"φ({factor} of r=8, {factor} of r=64, i, j), {{q,v}} seed 0"
        return panels, results / name, title, "i (r=8)", "j (r=64)"
    title = f"φ({factor} of seed 0, {factor} of seed 1, i, j), {{q,v}} r=64"
    return panels, results / name, title, "i (seed 0)", "j (seed 1)"


def plot_accuracy(rows: dict[str, dict], path: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    from lorakit.atomic import atomic_write

    fig, (left, right) = plt.subplots(1, 2, figsize=(10, 3.6))
    budget = [rows[f"{t}-r{r}"] for t, r in BUDGET if f"{t}-r{r}" in rows] or [{"accuracy_mean": 50.0}]
    left.bar(
        range(len(budget)),
        [row["accuracy_mean"] for row in budget],
        yerr=[row.get("accuracy_std") or 0 for row in budget],
        capsize=3,
        color="tab:blue",
    )
    left.set_xticks(
        range(len(budget)), [f"{row.get('targets', '')}\nr={row.get('r', '')}" for row in budget], fontsize=8
    )
    left.set_ylim(min(row["accuracy_mean"] for row in budget) - 5, max(row["accuracy_mean"] for row in budget) + 3)
    left.set_ylabel("SST-2 dev accuracy (%)")
    left.set_title("same budget (36,864 LoRA parameters)", fontsize=9)
    for targets, marker in zip(RANK_SETS, "os"):
        mine = [rows[f"{targets}-r{r}"] for r in RANKS if f"{targets}-r{r}" in rows]
        right.errorbar(
            [row["r"] for row in mine],
            [row["accuracy_mean"] for row in mine],
            yerr=[row["accuracy_std"] or 0 for row in mine],
            marker=marker,
            capsize=3,
            label=label(targets),
        )
    right.set_xscale("log", base=2)
    right.set_xlabel("rank r")
    right.set_title("rank", fontsize=9)
    right.legend()
    for ax in (left, right):
        ax.grid(alpha=0.3)
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    plt.close(fig)


# -- tables -----------------------------------------------------------------------------------------
def _acc(row: dict | None) -> str:
    if row is None:
        return "–"
    spread = f" ± {row['accuracy_std']:.1f}" if row["accuracy_std"] is not None else ""
    return f"{row['accuracy_mean']:.1f}{spread}"


def markdown(rows: dict[str, dict], analysis: dict, meta: dict) -> str:
    seeds = sorted({s for row in rows.values() for s in row["seeds"]})
    lines = [
        "## Which weights, which rank (MiniLM-L6, SST-2; the LoRA paper's Tables 5–7)",
        "",
        f"{meta['steps']} steps of batch 16 (AdamW, lr {meta['lr']:g}, 5 % warm-up then linear decay), LoRA alpha "
        f"{ALPHA:g} for every r, dropout 0.05, classifier head trained in full. Trained on lorakit's SST-2 sample "
        "(2,000 of the 67,349 training sentences: about 1.2 passes); accuracy on the full dev set (872 sentences), "
        f"mean ± sample std over seeds {seeds} (the seed sets the head's and A's init and the data order; "
        "the seeds column says which ran). "
        f"The base model with its untrained head scores {', '.join(map(str, meta['accuracy_before']))} % "
        "(per seed).",
        "",
        "**Same parameter budget** (36,864 LoRA parameters; trainable adds the 770 of the head):",
        "",
        "| weights | r | LoRA params | dev accuracy (%) | per seed |",
        "|---|---:|---:|---:|---|",
    ]
    for t, r in BUDGET:
        row = rows.get(f"{t}-r{r}")
        if row:
            lines.append(
                f"| {row['targets']} | {r} | {row['lora_parameters']:,} | {_acc(row)} | "
                f"{', '.join(f'{a:.1f}' for a in row['accuracies'])} |"
            )
    lines += [
        "",
        "**Rank** (dev accuracy %, mean ± std over the seeds that ran):",
        "",
        "| weights | " + " | ".join(f"r={r}" for r in RANKS) + " |",
        "|---|" + "---:|" * len(RANKS),
    ]
    for t in RANK_SETS:
        lines.append(f"| {label(t)} | " + " | ".join(_acc(rows.get(f"{t}-r{r}")) for r in RANKS) + " |")
    table7 = analysis.get("table7", {})
    if table7:
        ranks = sorted(table7, key=int)
        lines += [
            "",
            f"**ΔW vs W** (Table 7) for the query matrix of layer {MIDDLE}, {{q,v}} adapters of seed 0: "
            "‖UᵀW_qVᵀ‖_F with U, V the top-r singular directions of ΔW_q, of W_q, or random:",
            "",
            "| | " + " | ".join(f"r={r}" for r in ranks) + " |",
            "|---|" + "---:|" * len(ranks),
        ]
        q = {r: table7[r]["query"] for r in ranks}
        for name, key in (
            ("‖UᵀW_qVᵀ‖, ΔW_q's directions", "projection_delta"),
            ("‖UᵀW_qVᵀ‖, W_q's directions", "projection_weight"),
            ("‖UᵀW_qVᵀ‖, random directions", "projection_random"),
            ("‖W_q‖", "weight_norm"),
            ("‖ΔW_q‖", "delta_norm"),
            ("amplification ‖ΔW_q‖ / ‖UᵀW_qVᵀ‖", "amplification"),
            ("entropy effective rank of ΔW_q", "effective_rank"),
            ("singular values for 90 % of ‖ΔW_q‖²", "energy_rank"),
        ):
            lines.append(f"| {name} | " + " | ".join(_fmt(q[r][key]) for r in ranks) + " |")
        lines += [
            "",
            "Per layer (seed 0): ‖ΔW‖/‖W‖ and amplification of the query and value updates:",
            "",
            "| r | matrix | " + " | ".join(f"layer {i}" for i in range(6)) + " |",
            "|---|---|" + "---:|" * 6,
        ]
        for r in ranks:
            for kind in ("query", "value"):
                mine = sorted(
                    (row for row in analysis["per_layer"][r] if row["kind"].endswith(kind)),
                    key=lambda row: row["layer"],
                )
                for caption, field in (("‖ΔW‖/‖W‖", "relative_norm"), ("amplification", "amplification")):
                    lines.append(f"| {r} | {kind} {caption} | " + " | ".join(_fmt(row[field]) for row in mine) + " |")
    for key, title in (
        (
            "r8_vs_r64_A",
            "**Subspace similarity, r=8 vs r=64, input side** (Figure 3; {q,v} seed 0, right-singular vectors of A)",
        ),
        ("r8_vs_r64_B", "**The same, output side** (left-singular vectors of B)"),
        ("r64_seed0_vs_seed1_A", "**Subspace similarity, two seeds at r=64, input side** (Figure 4; {q,v}, A)"),
        ("r64_seed0_vs_seed1_B", "**The same, output side** (B)"),
    ):
        if key not in analysis:
            continue
        first = analysis[key][0]
        lines += [
            "",
            f"{title}: φ(1,1) (top directions), φ(1,r₂) (the first's top direction inside the second's "
            f"whole span), φ(r₁,r₂); random spans give max(i, j)/{first['dim']}: "
            f"{1 / first['dim']:.3f} for φ(1,1), {first['random_r1_r2']:.3f} for the other two.",
            "",
            "| matrix | " + " | ".join(f"layer {i}" for i in range(6)) + " |",
            "|---|" + "---:|" * 6,
        ]
        for kind in ("query", "value"):
            mine = sorted((row for row in analysis[key] if row["kind"].endswith(kind)), key=lambda row: row["layer"])
            for name, k in (("φ(1,1)", "phi_1_1"), ("φ(1,r₂)", "phi_1_r2"), ("φ(r₁,r₂)", "phi_r1_r2")):
                lines.append(f"| {kind} {name} | " + " | ".join(f"{row[k]:.3f}" for row in mine) + " |")
        lines += ["", f"![φ {key}](rank_study_{key}.png)"]
    lines += [
        "",
        "![spectra](rank_study_spectrum.png)",
        "",
        "![accuracy](rank_study_accuracy.png)",
        "",
        "The full `lorakit analyze` reports (every layer, φ grids, spectra) are written beside the adapters in "
        "runs/rank_study/analysis/ (not committed); e.g. "
        "`lorakit analyze runs/rank_study/qv-r8-s0 --compare runs/rank_study/qv-r64-s0` gives the first.",
        "",
        f"Command: `{meta['command']}`  ",
        f"Machine: {meta['cpu']}, {meta['cores']} cores shared with other engineers' jobs; torch {meta['torch']}, "
        f"1 thread. Load average (1, 5, 15 min) before / after: {meta['load_before']} / {meta['load_after']}; "
        f"{meta['runs']} runs in {meta['total_min']:.1f} min{meta['skipped_note']}.",
        "",
    ]
    return "\n".join(lines)


def _fmt(value: float | int | None) -> str:
    if value is None:
        return "–"
    return str(value) if isinstance(value, int) else f"{value:.3g}" if abs(value) < 0.1 else f"{value:.2f}"


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.split("\n")[0])
    parser.add_argument("--steps", type=int, default=150)
    parser.add_argument("--lr", type=float, default=1e-3)
    parser.add_argument("--seeds", type=lambda s: [int(x) for x in s.split(",")], default=[0, 1])
    parser.add_argument("--only", type=lambda s: s.split(","), default=None, help="configs, e.g. qv-r8,q-r64")
    parser.add_argument("--max-minutes", type=float, default=25.0, help="start no run that would end after this")
    parser.add_argument("--results", type=Path, default=RESULTS, help="folder for rank_study.json/.md and the PNGs")
    parser.add_argument("--adapters", type=Path, default=ADAPTERS, help="folder for the runs (adapters kept)")
    parser.add_argument(
        "--analyze-only", action="store_true", help="reuse the runs in rank_study.json and the kept adapters"
    )
    args = parser.parse_args()
    args.results.mkdir(parents=True, exist_ok=True)
    torch.set_num_threads(1)  # on 2 shared cores a second intra-op thread mostly waits (see bench/variants_sst2.py)
    from transformers.utils import logging as hf_logging

    hf_logging.set_verbosity_error()  # the new head's "MISSING" load report, once per run
    output = args.results / "rank_study.json"

    if args.analyze_only:
        saved = json.loads(output.read_text())
        runs, meta = saved["runs"], saved["meta"]
    else:
        names = args.only or config_names()
        unknown = sorted(set(names) - set(config_names()))
        if unknown:
            parser.error(f"unknown configs {unknown}; known: {config_names()}")
        # The runs the analysis reads first, then seed-major (a budget cut leaves whole seeds); after the first
        # seed the {q,v} rank sweep comes first.
        later = sorted(names, key=lambda n: not n.startswith("qv-"))
        full = [(name, seed) for k, seed in enumerate(args.seeds) for name in (names if k == 0 else later)]
        plan = [run for run in ANALYSED if run in full]
        plan += [run for run in full if run not in plan]
        load_before, begin, runs = load_average(), time.perf_counter(), []
        for k, (name, seed) in enumerate(plan):
            elapsed = (time.perf_counter() - begin) / 60
            if runs and elapsed + elapsed / len(runs) > args.max_minutes:
                print(f"budget of {args.max_minutes} min reached: {len(plan) - k} runs not started", flush=True)
                break
            run = run_one(name, seed, args)
            runs.append(run)
            output.write_text(json.dumps({"runs": runs}, indent=1))  # kept if a later run or the analysis fails
            print(
                f"[{k + 1}/{len(plan)}] {name:8s} seed {seed}  acc {run['accuracy']:.2f}  "
                f"{run['train_s']:.0f}s train {run['run_s']:.0f}s total  load {run['load_average'][1][0]}",
                flush=True,
            )
        skipped = len(plan) - len(runs)
        meta = {
            "command": " ".join(["nice -n 10" if os.nice(0) >= 10 else "", ".venv/bin/python", *sys.argv]).strip(),
            "steps": args.steps,
            "lr": args.lr,
            "seeds": args.seeds,
            "cpu": cpu_name(),
            "cores": os.cpu_count(),
            "torch": torch.__version__,
            "load_before": " ".join(map(str, load_before)),
            "load_after": " ".join(map(str, load_average())),
            "total_min": round((time.perf_counter() - begin) / 60, 1),
            "runs": len(runs),
            "skipped_note": f"; {skipped} planned runs not started (time budget)" if skipped else "",
            "accuracy_before": sorted({run["accuracy_before"] for run in runs}),
        }
    rows = summarise(runs)
    output.write_text(json.dumps({"meta": meta, "summary": rows, "runs": runs}, indent=1))
    from lorakit.models import load_model

    base, _ = load_model("minilm-l6", "seq-cls")
    analysis = analyse(base, runs, args.results)
    plot_accuracy(rows, args.results / "rank_study_accuracy.png")
    output.write_text(json.dumps({"meta": meta, "summary": rows, "analysis": analysis, "runs": runs}, indent=1))
    text = markdown(rows, analysis, meta)
    output.with_suffix(".md").write_text(text)
    print(text)


if __name__ == "__main__":
    main()
