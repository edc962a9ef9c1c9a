"""Issue 16's levers for the default E2E run, chosen on the validation set: one `lorakit train` per variant,
then `lorakit eval` of its adapter on E2E validation meaning representations (never the test set).

Data (built from the complete E2E files under $LORAKIT_DATA or ../shared/data, into <workdir>/data/e2e):

* training: the complete training set shuffled with a fixed seed; each run reads its first --train-rows rows
  (`--max-train-examples`), so every variant sees the same examples in the same order;
* validation: --dev-mrs meaning representations spread evenly over the 547 of devset.csv, with all their
  references — the file each run takes its validation loss from and that `lorakit eval --split validation`
  scores.

The variants (VARIANTS) each change one lever against the recipe before issue 16 (the chat template around an
instruction and the MR, LoRA on q,k,v,o, lr 1e-3, greedy decoding): the plain prompt format with the MR
alone, then on top of it LoRA on every linear layer or a higher learning rate, and the paper's beam search
(scored on an adapter trained above, `--beam-of`). The baseline row is the adapter of the default run before
issue 16 (`--baseline`; it trained on the 1,000-row sample, in 125 steps), scored the same way. The decodings
(DECODINGS) score the adapter of the default run (`--default-run`) greedily, with beam search of width 4 and
10, and with the ban on repeated 4-grams in the output; DEFAULT_VARIANTS are `lorakit train` as it is by
default (the shipped sample: 1,800 rows until SAMPLE_SIZES chose 2,600) with one option changed;
VARIANT_DECODINGS score some of the trained variants with beam search. CENTRAL_SAMPLES train on distinct MRs, each
with its central reference (`make_samples.e2e_central_rows`; default-run-central2600's sample is the one shipped
since; default-run-central-all takes every MR, the rows `lorakit train --references central` trains on;
default-run-central2600-r16 changes the rank, to 16 with α 32, which `lorakit train` takes since). Each
process uses one torch thread unless OMP_NUM_THREADS says otherwise, so two can share the two cores; wall times
are comparable only between runs that ran alone or side by side, which the JSON's `note` records.

    .venv/bin/python bench/experiments/e2e_levers.py --baseline runs/e2e-smollm2-135m   # hours on 2 cores
    .venv/bin/python bench/experiments/e2e_levers.py --collect --note "..."             # only the table

Writes bench/results/e2e_levers.json and the "e2e-levers" section of docs/results.md.
"""

from __future__ import annotations

import argparse
import csv
import io
import json
import os
import random
import subprocess
import sys
from pathlib import Path
from typing import Any

from methods_runs import update_docs_section, write_json

sys.path.insert(0, str(Path(__file__).resolve().parents[2] / "scripts"))  # make_samples.py
from make_samples import central_rng, e2e_central_rows, e2e_random_rows, read_csv, sample_rng, write_csv  # noqa: E402

sys.path.insert(0, str(Path(__file__).resolve().parents[1]))  # bench/common.py
from common import machine  # noqa: E402

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results" / "e2e_levers.json"
LORAKIT = str(REPO / ".venv" / "bin" / "lorakit")
PLAIN = ["--prompt-format", "plain", "--template", "{mr}"]
VARIANTS: dict[str, tuple[str, list[str]]] = {  # name -> (what it is, `lorakit train` options)
    "plain-qkvo": ("plain format, the MR alone; q,k,v,o; lr 1e-3", PLAIN),
    "plain-all-linear": ("as plain-qkvo, LoRA on all linear layers", [*PLAIN, "--target-modules", "all-linear"]),
    "plain-qkvo-lr2e-3": ("as plain-qkvo, lr 2e-3", [*PLAIN, "--lr", "2e-3"]),
}
DEFAULT_VARIANTS: dict[str, tuple[str, list[str]]] = {  # the default run (`lorakit train`) with one option changed
    "default-run-lr4e-3": ("the default run with lr 4e-3", ["--lr", "4e-3"]),
    "default-run-loraplus4": ("the default run with LoRA+ (B's lr 4× A's)", ["--loraplus-ratio", "4"]),
    "default-run-batch4": ("the default run with batch 4 (twice the steps)", ["--batch-size", "4"]),
    "default-run-batch4-lr1e-3": ("the default run with batch 4 and lr 1e-3", ["--batch-size", "4", "--lr", "1e-3"]),
    "default-run-all-linear": ("the default run with LoRA on all linear layers", ["--target-modules", "all-linear"]),
    "default-run-ls0.1": ("the default run with label smoothing 0.1 (the paper's)", ["--label-smoothing", "0.1"]),
    "default-run-all-linear-ls0.1": (
        "the default run with LoRA on all linear layers and label smoothing 0.1",
        ["--target-modules", "all-linear", "--label-smoothing", "0.1"],
    ),
    "default-run-dropout0": ("the default run (label smoothing 0.1) without LoRA dropout", ["--dropout", "0"]),
}


def beam10(length_penalty: str = "0.9") -> list[str]:
    """`lorakit eval` options for beam 10 without repeated 4-grams; the LoRA paper's length penalty is 0.9."""
    return ["--num-beams", "10", "--length-penalty", length_penalty, "--no-repeat-ngram-size", "4"]


# name -> (what, rows): the default run over a larger sample drawn as the shipped one is (which it contains)
SAMPLE_SIZES: dict[str, tuple[str, int]] = {
    "default-run-2600rows": ("the default run over a 2,600-row sample (the shipped 1,800 rows and 800 more)", 2600),
}
# name -> (what, MRs, attribute counts as in devset.csv, `lorakit train` options): the default run over distinct
# training MRs, each with its most central reference (`make_samples.e2e_central_rows`), with options changed
CENTRAL_SAMPLES: dict[str, tuple[str, int, bool, list[str]]] = {
    "default-run-central2600": (
        "the default run over 2,600 distinct training MRs, each with the reference closest to its other references",
        2600,
        False,
        [],
    ),
    "default-run-central-devlike": (
        "as default-run-central2600, but as many MRs of each attribute count as devset.csv's shares ask (2,300 MRs)",
        2600,
        True,
        [],
    ),
    "default-run-central-all": (
        "the default run over all 4,862 training MRs, each with its central reference (as `--references central`; "
        "608 steps, twice the time)",
        4862,
        False,
        [],
    ),
    "default-run-central2600-r16": (
        "as default-run-central2600 with rank 16, α 32",
        2600,
        False,
        ["--r", "16", "--alpha", "32"],
    ),
}
BEAM = beam10()  # the LoRA paper's decoding
BEAM4 = ["--num-beams", "4", "--length-penalty", "0.9"]
NO_REPEAT = BEAM[-2:]
DECODINGS: dict[str, tuple[str, list[str]]] = {  # name -> (what, `lorakit eval` options) for --default-run's adapter
    "default-run": ("the default run (`make train`: the 1,800-row sample, plain, lr 2e-3); greedy", []),
    "default-run+no-repeat": ("its adapter; greedy, no repeated 4-gram in the output", NO_REPEAT),
    "default-run+beam4": ("its adapter; beam 4, length penalty 0.9", BEAM4),
    "default-run+beam4+no-repeat": ("its adapter; beam 4, length penalty 0.9, no repeated 4-gram", BEAM4 + NO_REPEAT),
    "default-run+beam10": ("its adapter; the paper's beam 10, length penalty 0.9, no repeated 4-gram", BEAM),
}
# name -> (what, the run whose adapter it scores, `lorakit eval` options): beam search on trained variants
VARIANT_DECODINGS: dict[str, tuple[str, str, list[str]]] = {
    "plain-qkvo+beam4+no-repeat": (
        "plain-qkvo's adapter; beam 4, lp 0.9, no repeated 4-gram",
        "plain-qkvo",
        BEAM4 + NO_REPEAT,
    ),
    "plain-all-linear+beam4+no-repeat": (
        "plain-all-linear's adapter; beam 4, lp 0.9, no repeated 4-gram",
        "plain-all-linear",
        BEAM4 + NO_REPEAT,
    ),
    "default-run-all-linear+beam4+no-repeat": (
        "its adapter; beam 4, lp 0.9, no repeated 4-gram",
        "default-run-all-linear",
        BEAM4 + NO_REPEAT,
    ),
    "default-run-all-linear+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-all-linear",
        BEAM,
    ),
    "default-run-ls0.1+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-ls0.1",
        BEAM,
    ),
    "default-run-ls0.1+beam10-lp1.2": (
        "its adapter; beam 10, no repeated 4-gram, length penalty 1.2 (longer outputs)",
        "default-run-ls0.1",
        beam10("1.2"),
    ),
    "default-run-ls0.1+beam10-lp1.5": (
        "its adapter; beam 10, no repeated 4-gram, length penalty 1.5",
        "default-run-ls0.1",
        beam10("1.5"),
    ),
    "default-run-2600rows+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-2600rows",
        BEAM,
    ),
    "default-run-central2600+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-central2600",
        BEAM,
    ),
    "default-run-central-devlike+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-central-devlike",
        BEAM,
    ),
    "default-run-central-all+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-central-all",
        BEAM,
    ),
    "default-run-central2600-r16+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-central2600-r16",
        BEAM,
    ),
    "default-run-all-linear-ls0.1+beam10": (
        "its adapter; the paper's beam 10, lp 0.9, no repeated 4-gram",
        "default-run-all-linear-ls0.1",
        BEAM,
    ),
}
METRICS = ("bleu", "nist", "rouge_l", "chrf")


def build_data(source: Path, workdir: Path, dev_mrs: int) -> Path:
    """The folder the runs read as $LORAKIT_DATA: e2e/ with shuffled training rows and the validation subset
    (also as the test file, so nothing a run does touches the test set). A file already as it should be is left
    alone, so runs started side by side never read one half-written."""
    folder = workdir / "data" / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    train, dev = read_rows(source / "trainset.csv"), read_rows(source / "devset.csv")
    random.Random(5).shuffle(train)
    mrs = list(dict.fromkeys(row["mr"] for row in dev))
    picked = {mrs[i * len(mrs) // dev_mrs] for i in range(dev_mrs)}
    subset = [row for row in dev if row["mr"] in picked]
    for name, rows in [("trainset.csv", train[:6000]), ("devset.csv", subset), ("testset_w_refs.csv", subset)]:
        text = io.StringIO(newline="")
        writer = csv.DictWriter(text, fieldnames=["mr", "ref"], extrasaction="ignore")
        writer.writeheader()
        writer.writerows(rows)
        path, content = folder / name, text.getvalue().encode("utf-8")
        if not path.is_file() or path.read_bytes() != content:
            path.write_bytes(content)
    return folder.parent


def build_sample(workdir: Path, name: str, rows: list[list[str]], validation_root: Path) -> Path:
    """The folder a run over a sample of the training set reads as $LORAKIT_DATA (`--data e2e-full`): `rows`
    ([mr, ref]) for training, the validation subset of `validation_root` as its validation and test files."""
    folder = workdir / f"data-{name}" / "e2e"
    folder.mkdir(parents=True, exist_ok=True)
    write_csv(folder / "trainset.csv", ["mr", "ref"], rows)
    for split in ("devset.csv", "testset_w_refs.csv"):
        (folder / split).write_bytes((validation_root / "e2e" / split).read_bytes())
    return folder.parent


def read_rows(path: Path) -> list[dict[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return list(csv.DictReader(f))


def lorakit(args: list[str], data_root: Path, log: Path) -> None:
    """One lorakit command on one torch thread unless OMP_NUM_THREADS says otherwise, its output in `log`."""
    env = {**os.environ, "LORAKIT_DATA": str(data_root), "OMP_NUM_THREADS": os.environ.get("OMP_NUM_THREADS", "1")}
    with log.open("w") as out:
        subprocess.run([LORAKIT, *args], env=env, stdout=out, stderr=subprocess.STDOUT, check=True)


def train(name: str, options: list[str], workdir: Path, data_root: Path, train_rows: int) -> None:
    args = ["train", "--data", "e2e-full", "--max-train-examples", str(train_rows), "--eval-examples", "1"]
    args += ["--output", str(workdir / "runs" / name), "--overwrite", "--no-progress", *options]
    lorakit(args, data_root, workdir / f"train_{name}.log")


def train_default(name: str, options: list[str], workdir: Path, data_root: Path) -> None:
    """`lorakit train` with its defaults (the shipped sample) but `options`."""
    args = ["train", "--eval-examples", "1", "--output", str(workdir / "runs" / name), "--overwrite", "--no-progress"]
    lorakit([*args, *options], data_root, workdir / f"train_{name}.log")


def evaluate(name: str, adapter: Path, workdir: Path, data_root: Path, extra: list[str]) -> None:
    output = workdir / "evals" / f"{name}.json"
    output.parent.mkdir(parents=True, exist_ok=True)
    args = ["eval", "--adapter", str(adapter), "--data", "e2e-full", "--split", "validation", "--output", str(output)]
    lorakit([*args, *extra], data_root, workdir / f"eval_{name}.log")


def row(name: str, what: str, workdir: Path, run: Path | None) -> dict[str, Any]:
    """One table row: validation scores, and the run's training figures when it has a run folder."""
    scores = json.loads((workdir / "evals" / f"{name}.json").read_text())["metrics"]
    out: dict[str, Any] = {"name": name, "what": what, **{m: scores.get(m) for m in METRICS}}
    if run is not None and (run / "results.json").is_file():
        results = json.loads((run / "results.json").read_text())
        losses = [json.loads(line) for line in (run / "metrics.jsonl").read_text().splitlines()]
        out.update(
            steps=results["train"]["steps"],
            rows=results["data"]["training"]["rows"],
            train_s=results["train"]["wall_time_s"],
            tokens_per_s=results["train"]["tokens_per_s"],
            trainable=results["train"]["trainable_parameters"],
            val_loss=[entry["eval_loss"] for entry in losses if "eval_loss" in entry][-1],
        )
    return out


def markdown(rows: list[dict[str, Any]], meta: dict[str, Any]) -> str:
    lines = [
        f"{meta['dev_mrs']} validation MRs spread over E2E's devset.csv (all references), greedy unless the row says "
        f"beam; each plain-* run: one pass over the first {meta['train_rows']} rows of the shuffled complete "
        "training set, the default-run* runs over the shipped sample of 1,800 rows (2,600 in default-run-2600rows, "
        "the sample shipped next; default-run-central*: distinct MRs with their central references, "
        "default-run-central2600's sample shipped since); batch 8, r=8, α=16, dropout 0.05. "
        "val. loss: the plain cross-entropy of validation targets, also for the label-smoothed runs (*-ls0.1). "
        "Command: `python bench/experiments/e2e_levers.py`.",
        "",
        "| variant | what | BLEU | NIST | ROUGE-L | chrF | val. loss | trainable | steps | train time | tokens/s |",
        "|---|---|---:|---:|---:|---:|---:|---:|---:|---:|---:|",
    ]
    for r in rows:
        train = (
            [
                f"{r['val_loss']:.3f}",
                f"{r['trainable']:,}",
                str(r["steps"]),
                f"{r['train_s']:.0f} s",
                f"{r['tokens_per_s']:.0f}",
            ]
            if "steps" in r
            else ["", "", "", "", ""]
        )
        scores = [f"{r[m]:.2f}" if m == "nist" else f"{r[m]:.1f}" for m in METRICS]
        lines.append("| " + " | ".join([r["name"], r["what"], *scores, *train]) + " |")
    lines += ["", f"Machine: {meta['machine']['cpu']}, {meta['machine']['cpus']} cores. {meta['note']}"]
    return "\n".join(lines)


def run_all(args: argparse.Namespace, data_root: Path) -> None:
    """Every training and evaluation the table needs (`args.only`: just those named)."""

    def wanted(name: str) -> bool:
        return not args.only or name in args.only

    for name, (_, options) in VARIANTS.items():
        if wanted(name):
            train(name, options, args.workdir, data_root, args.train_rows)
            evaluate(name, args.workdir / "runs" / name, args.workdir, data_root, [])
    if wanted(f"{args.beam_of}+beam"):
        evaluate(f"{args.beam_of}+beam", args.workdir / "runs" / args.beam_of, args.workdir, data_root, BEAM)
    if args.baseline is not None and wanted("baseline"):
        evaluate("baseline", args.baseline, args.workdir, data_root, [])
    for name, (_, options) in DECODINGS.items():
        if args.default_run is not None and wanted(name):
            evaluate(name, args.default_run, args.workdir, data_root, options)
    for name, (_, options) in DEFAULT_VARIANTS.items():
        if wanted(name):
            train_default(name, options, args.workdir, data_root)
            evaluate(name, args.workdir / "runs" / name, args.workdir, data_root, [])
    for name, (_, rows) in SAMPLE_SIZES.items():
        if wanted(name):
            sample = e2e_random_rows(read_csv(args.source / "trainset.csv")[1], sample_rng("e2e"), rows)
            sample_root = build_sample(args.workdir, f"{rows}rows", sample, data_root)
            train_default(name, ["--data", "e2e-full"], args.workdir, sample_root)
            evaluate(name, args.workdir / "runs" / name, args.workdir, data_root, [])
    for name, (_, mrs, like_dev, options) in CENTRAL_SAMPLES.items():
        if wanted(name):
            like = read_csv(args.source / "devset.csv")[1] if like_dev else None
            sample = e2e_central_rows(read_csv(args.source / "trainset.csv")[1], central_rng(mrs), mrs, like)
            sample_root = build_sample(args.workdir, name, sample, data_root)
            train_default(name, ["--data", "e2e-full", *options], args.workdir, sample_root)
            evaluate(name, args.workdir / "runs" / name, args.workdir, data_root, [])
    for name, (_, run, options) in VARIANT_DECODINGS.items():
        if wanted(name):
            evaluate(name, args.workdir / "runs" / run, args.workdir, data_root, options)


def collect(args: argparse.Namespace) -> None:
    """The table from the work folder's evaluations; rows whose files are gone (an earlier machine's) are kept as
    bench/results/e2e_levers.json has them."""
    scored = [("baseline", "before issue 16: chat template, instruction + MR; q,k,v,o; lr 1e-3; 1,000 rows", None)]
    scored += [(name, what, args.workdir / "runs" / name) for name, (what, _) in VARIANTS.items()]
    scored += [(f"{args.beam_of}+beam", "its adapter; beam 10, length penalty 0.9, no repeated 4-gram", None)]
    scored += [(n, w, args.default_run if n == "default-run" else None) for n, (w, _) in DECODINGS.items()]
    scored += [(name, what, args.workdir / "runs" / name) for name, (what, _) in DEFAULT_VARIANTS.items()]
    scored += [(name, what, args.workdir / "runs" / name) for name, (what, _) in SAMPLE_SIZES.items()]
    scored += [(name, what, args.workdir / "runs" / name) for name, (what, *_) in CENTRAL_SAMPLES.items()]
    scored += [(name, what, None) for name, (what, _, _) in VARIANT_DECODINGS.items()]
    earlier = {r["name"]: r for r in json.loads(RESULTS.read_text())["rows"]} if RESULTS.is_file() else {}
    rows = []
    for name, what, run in scored:
        if (args.workdir / "evals" / f"{name}.json").is_file():
            rows.append(row(name, what, args.workdir, run))
        elif name in earlier:
            rows.append(earlier[name])
    meta = {"train_rows": args.train_rows, "dev_mrs": args.dev_mrs, "machine": machine(), "note": args.note}
    write_json(RESULTS, {"meta": meta, "rows": rows})
    table = markdown(rows, meta)
    update_docs_section(
        "e2e-levers", "## Which settings for the default E2E run (issue 16, validation set)\n\n" + table
    )
    print(table)


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--workdir", type=Path, default=REPO / "runs" / "e2e_levers")
    parser.add_argument(
        "--source", type=Path, default=Path(os.environ.get("LORAKIT_DATA", REPO.parent / "shared" / "data")) / "e2e"
    )
    parser.add_argument("--train-rows", type=int, default=2000)
    parser.add_argument("--dev-mrs", type=int, default=120)
    parser.add_argument("--baseline", type=Path, help="adapter of the earlier default run, scored as the baseline")
    parser.add_argument("--default-run", type=Path, help="the default run's folder, its adapter scored with DECODINGS")
    parser.add_argument("--beam-of", default="plain-qkvo-lr2e-3", help="the variant whose adapter beam search decodes")
    parser.add_argument("--collect", action="store_true", help="only build the table from the work folder")
    parser.add_argument(
        "--only", nargs="+", help="run only these default-run variants and decodings, leaving the table to --collect"
    )
    parser.add_argument("--note", default="", help="how the runs were run (side by side, threads)")
    args = parser.parse_args()

    if not args.collect:
        run_all(args, build_data(args.source, args.workdir, args.dev_mrs))
    if not args.only:
        collect(args)


if __name__ == "__main__":
    main()
