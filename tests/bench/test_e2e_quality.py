"""The README's E2E table: what bench/readme_tables.py renders from bench/results/e2e_quality.json, and the
whole-test evaluations it reads, re-scored from their saved predictions by sacrebleu with the references
gathered here (not by lorakit's loader): the figures are what those outputs score on the complete test set."""

from __future__ import annotations

import csv
import json
from pathlib import Path

import pytest
import sacrebleu

from support.bench import bench_module

REPO = Path(__file__).resolve().parents[2]
RESULTS = REPO / "bench" / "results"
FULL_TEST = REPO.parent / "shared" / "data" / "e2e" / "testset_w_refs.csv"


@pytest.fixture(scope="module")
def readme_tables():
    with bench_module("readme_tables") as module:
        yield module


def test_readme_e2e_table_is_current(readme_tables):
    """Regenerate with `.venv/bin/python bench/readme_tables.py e2e-quality` after adding a row or a result."""
    text = (REPO / "README.md").read_text()
    assert readme_tables.regenerated(text, {"e2e-quality": readme_tables.e2e_quality_table()}) == text


def test_a_row_reads_its_scores_from_its_file_or_states_them(readme_tables, tmp_path):
    run = {"before": {"bleu": 1.0, "nist": 0.5, "rouge_l": 2.0, "chrf": 3.0}, "total_time_s": 753.0}
    run["after"] = {"bleu": 64.25, "nist": 8.126, "rouge_l": 66.04, "chrf": 65.96}
    (tmp_path / "run.json").write_text(json.dumps(run))
    row = {"run": "a run ({minutes} min)", "trained_on": "t", "scored_on": "s", "file": "run.json", "part": "after"}
    assert readme_tables.e2e_quality_row(row, tmp_path) == "| a run (12.6 min) | t | s | 64.2 | 8.13 | 66.0 | 66.0 |"
    stated = {"run": "paper", "trained_on": "t", "scored_on": "s"}
    stated["scores"] = {"bleu": 70.4, "nist": 8.85, "rouge_l": 71.8, "chrf": "—"}
    assert readme_tables.e2e_quality_row(stated, tmp_path) == "| paper | t | s | 70.4 | 8.85 | 71.8 | — |"


def whole_test_evaluations() -> list[Path]:
    rows = json.loads((RESULTS / "e2e_quality.json").read_text())["rows"]
    return [RESULTS / row["file"] for row in rows if "file" in row and "part" not in row]


@pytest.fixture(scope="module")
def references() -> dict[str, list[str]]:
    """Every reference of each test MR, in the test file's order of MRs."""
    if not FULL_TEST.is_file():
        pytest.skip("needs the complete E2E test set under ../shared/data")
    gathered: dict[str, list[str]] = {}
    with FULL_TEST.open(encoding="utf-8", newline="") as f:
        for row in csv.DictReader(f):
            gathered.setdefault(row["mr"], []).append(row["ref"])
    return gathered


@pytest.mark.parametrize("evaluation", whole_test_evaluations(), ids=lambda p: p.stem)
def test_whole_test_bleu_is_what_sacrebleu_gives_its_predictions(evaluation, references):
    """The table's whole-test BLEU, recomputed from the saved predictions against every reference of each of
    the 630 MRs (in the test file's order, lowercased as lorakit's E2E scoring does)."""
    saved = json.loads(evaluation.read_text())
    assert len(saved["predictions"]) == len(references) == 630
    width = max(len(refs) for refs in references.values())
    streams = [[refs[i] if i < len(refs) else None for refs in references.values()] for i in range(width)]
    expected = sacrebleu.corpus_bleu(saved["predictions"], streams, lowercase=True).score
    assert saved["metrics"]["bleu"] == pytest.approx(expected, abs=0.01)
