"""The README's estimate tables stay what bench/readme_tables.py computes from today's estimator, and the script
rewrites exactly what stands between a table's markers."""

from __future__ import annotations

import sys
from pathlib import Path

import pytest

from support.bench import bench_module

REPO = Path(__file__).resolve().parents[2]
# Computed on meta from configs alone (no weights read); the measured table needs the bench results and is
# regenerated after a measurement instead.
ESTIMATE_TABLES = ["estimate-smollm2", "estimate-checkpointing", "estimate-llama-7b"]


@pytest.fixture(scope="module")
def readme_tables():
    """bench/readme_tables.py as a module (the bench scripts import their siblings by bare name)."""
    with bench_module("readme_tables") as module:
        yield module


def test_replace_table_rewrites_only_between_its_markers(readme_tables):
    text = "intro\n<!-- table:a -->\nold\nrows\n<!-- /table:a -->\nmiddle\n<!-- table:b -->\nkept\n<!-- /table:b -->\n"
    assert readme_tables.replace_table(text, "a", "| new |") == (
        "intro\n<!-- table:a -->\n| new |\n<!-- /table:a -->\nmiddle\n<!-- table:b -->\nkept\n<!-- /table:b -->\n"
    )
    empty = "<!-- table:a -->\n<!-- /table:a -->\n"  # as a new table's markers are first written
    assert readme_tables.replace_table(empty, "a", "| new |") == "<!-- table:a -->\n| new |\n<!-- /table:a -->\n"
    with pytest.raises(ValueError, match="exactly one"):
        readme_tables.replace_table(text, "c", "x")
    with pytest.raises(ValueError, match="exactly one"):
        readme_tables.replace_table(text + text, "a", "x")


@pytest.mark.slow  # three estimates of SmolLM2 and seven of a 7B Llama, played on meta
def test_readme_estimate_tables_are_current(readme_tables):
    """`bench/readme_tables.py --check` for the estimate tables: regenerate them with
    `.venv/bin/python bench/readme_tables.py` when this fails after a change to the estimator."""
    tables = {name: readme_tables.TABLES[name]() for name in ESTIMATE_TABLES}
    text = (REPO / "README.md").read_text()
    assert readme_tables.regenerated(text, tables) == text


def test_check_exits_1_and_writes_nothing_when_the_readme_is_stale(readme_tables, tmp_path, monkeypatch):
    stale = "# x\n<!-- table:t -->\n| a hand-edited table |\n<!-- /table:t -->\nrest\n"
    readme = tmp_path / "README.md"
    readme.write_text(stale)
    monkeypatch.setattr(readme_tables, "README", readme)
    monkeypatch.setattr(readme_tables, "TABLES", {"t": lambda: "| computed |"})
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--check"])
    with pytest.raises(SystemExit) as stopped:
        readme_tables.main()
    assert stopped.value.code == 1 and readme.read_text() == stale
    monkeypatch.setattr(sys, "argv", ["readme_tables.py"])
    readme_tables.main()
    assert readme.read_text() == "# x\n<!-- table:t -->\n| computed |\n<!-- /table:t -->\nrest\n"
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--check", "t"])
    readme_tables.main()  # current now: returns without exiting
    monkeypatch.setattr(sys, "argv", ["readme_tables.py", "--check", "no-such-table"])
    with pytest.raises(SystemExit) as refused:
        readme_tables.main()
    assert refused.value.code == 2
