"""The README's `lorakit estimate` tables, regenerated from the code instead of kept by hand.

Each table sits in README.md between two marker comments, `<!-- table:NAME -->` and `<!-- /table:NAME -->`;
this script computes it and rewrites what is between them (nothing else in the file changes):

* estimate-smollm2: `lorakit.estimation.compare` for SmolLM2-135M, fp32, batch 4 × 128, CPU, with today's
  default options (rank, dropout, prefix and prompt lengths), rendered with the rows `lorakit estimate`
  prints (`lorakit.estimation.report.rows`);
* estimate-checkpointing: SmolLM2-135M's LoRA column again, without and with `--grad-checkpointing`;
* estimate-llama-7b: `compare` for the 7B Llama config in bench/configs/llama-2-7b.json, bf16 (a bf16 base,
  float32 master weights for what trains), batch 1 × 2048, `--device cuda`, with the time per step at
  400 TFLOP/s;
* estimate-vs-measured: the peaks bench/estimate_vs_measured.py measured (its saved JSON in bench/results/)
  against today's estimate of the same configurations, compared as that script compares them;
* memory-length: the training memory against sequence length bench/memory_length.py measured
  (bench/results/memory_length.json) beside today's estimate of each point, as that script prints it;
* memory-blocks: the same script's batch 8 × 1024 with none, some and the auto choice of blocks checkpointed
  (bench/results/memory_blocks.json);
* train-step: the training-step rows bench/train_step.py saved (bench/results/train_step.json), as it prints them;
* train-e2e: the same file's end-to-end E2E rows (floor, lorakit, PEFT + Trainer), as it prints them;
* e2e-quality: the E2E scores of the default run, the whole-test evaluations and the paper, row by row as
  bench/results/e2e_quality.json lists them (each row's scores read from the results file it names).

    .venv/bin/python bench/readme_tables.py            # rewrite every table in README.md
    .venv/bin/python bench/readme_tables.py --check    # exit 1 when README.md differs from what it would write
    .venv/bin/python bench/readme_tables.py --check estimate-smollm2   # only this table

It lives in bench/ beside the measurements it tabulates: it imports estimate_vs_measured's and memory_length's
results files and comparisons as sibling modules (as the bench scripts import `common`), so the README's errors
are computed by the same code that prints them after a measurement.
"""

from __future__ import annotations

import argparse
import difflib
import json
import os
import re
import sys
from collections.abc import Callable
from pathlib import Path
from typing import Any

import e2e_speed
import memory_length
import train_step
from estimate_vs_measured import comparison, estimated, results_file

from lorakit.estimation import Estimate, compare, estimate
from lorakit.estimation.report import footnotes, rows

README = Path(__file__).resolve().parents[1] / "README.md"
LLAMA_7B = Path(__file__).resolve().parent / "configs" / "llama-2-7b.json"
LLAMA_7B_TFLOPS = 400.0
# (batch size, max length, precision) of the saved measurements the README shows, in this order.
MEASURED = ((4, 128, "fp32"), (8, 256, "fp32"), (4, 128, "bf16"))
E2E_QUALITY = Path(__file__).resolve().parent / "results" / "e2e_quality.json"
E2E_METRICS = {"bleu": "{:.1f}", "nist": "{:.2f}", "rouge_l": "{:.1f}", "chrf": "{:.1f}"}  # the README's columns
MODEL_NAMES = {"smollm2-135m": "SmolLM2-135M", "minilm-l6": "MiniLM-L6"}
METHOD_NAMES = {"full": "full", "lora": "LoRA", "qlora": "QLoRA"}


def markdown_table(estimates: list[Estimate | str], tflops: float | None = None, names: list[str] | None = None) -> str:
    """The rows `lorakit estimate --all-methods` prints, one column per estimate (n/a where the method does not
    apply; headed by `names`, else the methods), as a markdown table with the peak in bold, then the command's
    footnotes (LoRA targets, why n/a)."""
    done = [e for e in estimates if isinstance(e, Estimate)]
    labels = [label for label, _ in rows(done[0], tflops)]
    columns = [
        [value for _, value in rows(e, tflops)] if isinstance(e, Estimate) else ["n/a"] * len(labels) for e in estimates
    ]
    names = names or [e.method if isinstance(e, Estimate) else e.split(":", 1)[0] for e in estimates]
    lines = ["| | " + " | ".join(names) + " |", "|---|" + "---:|" * len(names)]
    for index, label in enumerate(labels):
        cells = [label, *[column[index] for column in columns]]
        if label == "peak training memory":
            cells = [f"**{cell}**" for cell in cells]
        lines.append("| " + " | ".join(cells) + " |")
    notes = footnotes(estimates)
    return "\n".join(lines) + ("\n\n" + "; ".join(notes) + "." if notes else "")


def smollm2_table() -> str:
    return markdown_table(compare("smollm2-135m", batch_size=4, max_length=128))


def checkpointing_table() -> str:
    """SmolLM2-135M LoRA as in `smollm2_table`, without and with gradient checkpointing."""
    estimates: list[Estimate | str] = [
        estimate("smollm2-135m", "lora", batch_size=4, max_length=128, grad_checkpointing=on) for on in (False, True)
    ]
    return markdown_table(estimates, names=["lora", "lora, --grad-checkpointing"])


def llama_7b_table() -> str:
    estimates = compare(str(LLAMA_7B), batch_size=1, max_length=2048, dtype="bf16", device="cuda")
    return markdown_table(estimates, LLAMA_7B_TFLOPS)


def _percent(fraction: float) -> str:
    return f"{100 * fraction:+.1f} %".replace("-", "−")


def _megabytes(n: int) -> str:
    return f"{n / 1e6:,.0f} MB"


def measured_table() -> str:
    """One row per saved measurement: today's estimate, the two measured peaks and the errors; then the load
    each file was measured under."""
    lines = [
        "| model, method, batch, precision | estimated total | measured (default malloc) | error "
        "| estimated without malloc slack | measured (`MALLOC_MMAP_THRESHOLD_=131072`) | error |",
        "|---|---:|---:|---:|---:|---:|---:|",
    ]
    loads = []
    for batch_size, max_length, precision in MEASURED:
        saved = json.loads(results_file(batch_size, max_length, precision).read_text())
        loads.append(f"{batch_size} × {max_length} {precision}: {saved['uptime'].split('load average: ')[-1]}")
        for row in saved["rows"]:
            est = estimated(row["model"], row["method"], batch_size, max_length, precision)
            row = comparison(row, est)
            name = (
                f"{MODEL_NAMES[row['model']]}, {METHOD_NAMES[row['method']]}, {batch_size} × {max_length}, {precision}"
            )
            cells = [
                name,
                _megabytes(est["total_bytes"]),
                _megabytes(row["default"]["measured_bytes"]),
                _percent(row["error"]),
                _megabytes(row["estimate_without_slack"]),
                _megabytes(row["mmap"]["measured_bytes"]),
                _percent(row["error_without_slack"]),
            ]
            lines.append("| " + " | ".join(cells) + " |")
    return "\n".join(lines) + "\n\nLoad average (1, 5, 15 min) at the end of each run: " + "; ".join(loads) + "."


def memory_length_table(path: Path = memory_length.JSON_FILE) -> str:
    """bench/memory_length.py's saved points (checkpointing off and on) beside today's estimate of each."""
    saved = json.loads(path.read_text())
    return memory_length.markdown(memory_length.with_todays_estimates(saved))


def memory_blocks_table() -> str:
    """bench/memory_length.py's 8 × 1024 points with some blocks checkpointed, as `memory_length_table`."""
    return memory_length_table(memory_length.RESULTS / "memory_blocks.json")


def train_step_table() -> str:
    """bench/train_step.py's saved training-step rows (floor, lorakit, PEFT, full fine-tuning)."""
    saved = json.loads(train_step.RESULTS.read_text())
    return train_step.table({"steps": saved["steps"]})


def train_e2e_table() -> str:
    """bench/train_step.py's saved end-to-end rows on the E2E sample."""
    return "\n".join(e2e_speed.e2e_table(json.loads(train_step.RESULTS.read_text())["e2e"]))


def e2e_quality_row(row: dict[str, Any], results: Path) -> str:
    """One row of the E2E table: its scores from the file it names (a run's results.json: `part`'s scores;
    a `lorakit eval --output` file: its metrics), or as the row states them (text such as "—" as written)."""
    minutes, scores = "", row.get("scores", {})
    if "file" in row:
        saved = json.loads((results / row["file"]).read_text())
        scores = saved[row["part"]] if "part" in row else saved["metrics"]
        minutes = f"{saved['total_time_s'] / 60:.1f}" if "total_time_s" in saved else ""
    cells = [row["run"].format(minutes=minutes), row["trained_on"], row["scored_on"]]
    cells += [scores[m] if isinstance(scores[m], str) else form.format(scores[m]) for m, form in E2E_METRICS.items()]
    return "| " + " | ".join(cells) + " |"


def e2e_quality_table() -> str:
    """The README's E2E table (bench/results/e2e_quality.json's rows)."""
    listed = json.loads(E2E_QUALITY.read_text())["rows"]
    lines = ["| run | trained on | scored on | BLEU | NIST | ROUGE-L | chrF |", "|---|---|---|---:|---:|---:|---:|"]
    return "\n".join(lines + [e2e_quality_row(row, E2E_QUALITY.parent) for row in listed])


TABLES: dict[str, Callable[[], str]] = {
    "estimate-smollm2": smollm2_table,
    "estimate-checkpointing": checkpointing_table,
    "estimate-llama-7b": llama_7b_table,
    "estimate-vs-measured": measured_table,
    "memory-length": memory_length_table,
    "memory-blocks": memory_blocks_table,
    "train-step": train_step_table,
    "train-e2e": train_e2e_table,
    "e2e-quality": e2e_quality_table,
}


def replace_table(text: str, name: str, table: str) -> str:
    """`text` with what stands between the markers of table `name` replaced by `table`."""
    begin, end = f"<!-- table:{name} -->", f"<!-- /table:{name} -->"
    pattern = re.compile(rf"{re.escape(begin)}\n.*?{re.escape(end)}", re.DOTALL)
    if len(pattern.findall(text)) != 1:
        raise ValueError(f"README.md needs exactly one {begin} ... {end} pair")
    return pattern.sub(lambda _: f"{begin}\n{table}\n{end}", text)


def regenerated(text: str, tables: dict[str, str]) -> str:
    """`text` with each table of `tables` (name: its markdown) in place."""
    for name, table in tables.items():
        text = replace_table(text, name, table)
    return text


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter)
    parser.add_argument("tables", nargs="*", help=f"which tables: {', '.join(TABLES)} (default: all)")
    parser.add_argument("--check", action="store_true", help="write nothing; exit 1 when README.md is not current")
    args = parser.parse_args()
    unknown = sorted(set(args.tables) - set(TABLES))
    if unknown:
        parser.error(f"unknown table {', '.join(unknown)}; expected {', '.join(TABLES)}")
    tables = {name: TABLES[name]() for name in args.tables or TABLES}
    current = README.read_text()  # read after the slow part: others may edit the README meanwhile
    new = regenerated(current, tables)
    if args.check:
        if new != current:
            sys.stdout.writelines(difflib.unified_diff(current.splitlines(True), new.splitlines(True), "README.md"))
            sys.exit(1)
        return
    if new != current:
        temporary = README.with_name(README.name + ".tmp")
        temporary.write_text(new)
        os.replace(temporary, README)  # whole or not at all


if __name__ == "__main__":
    main()
