"""scripts/make_samples.py draws the shipped E2E sample again byte for byte from the complete data, and a larger
draw keeps every row of the shipped one (so a run over it sees the default run's rows and more)."""

from __future__ import annotations

import csv
import sys
from pathlib import Path

import pytest

REPO = Path(__file__).resolve().parents[1]
FULL_E2E = REPO.parent / "shared" / "data" / "e2e"
SHIPPED = REPO / "src" / "lorakit" / "samples" / "e2e"

pytestmark = pytest.mark.skipif(not FULL_E2E.is_dir(), reason="needs the complete E2E data under ../shared/data")


@pytest.fixture(scope="module")
def make_samples():
    sys.path.insert(0, str(REPO / "scripts"))
    try:
        import make_samples

        yield make_samples
    finally:
        sys.path.remove(str(REPO / "scripts"))


def rows(path: Path) -> list[tuple[str, str]]:
    with path.open(encoding="utf-8", newline="") as f:
        return [(row["mr"], row["ref"]) for row in csv.DictReader(f)]


def test_the_shipped_e2e_sample_is_drawn_again_byte_for_byte(make_samples, tmp_path):
    make_samples.make_e2e(FULL_E2E, tmp_path, make_samples.sample_rng("e2e"))
    for name in ("trainset.csv", "devset.csv", "testset_w_refs.csv"):
        assert (tmp_path / name).read_bytes() == (SHIPPED / name).read_bytes(), name


def test_a_larger_draw_contains_the_shipped_sample_and_the_same_evaluation_files(make_samples, tmp_path):
    size = make_samples.E2E_TRAIN_SIZE + 800
    make_samples.make_e2e(FULL_E2E, tmp_path, make_samples.sample_rng("e2e"), train_size=size)
    larger, shipped = rows(tmp_path / "trainset.csv"), rows(SHIPPED / "trainset.csv")
    assert len(larger) == size and len(shipped) == make_samples.E2E_TRAIN_SIZE
    assert not set(shipped) - set(larger)
    assert (tmp_path / "devset.csv").read_bytes() == (SHIPPED / "devset.csv").read_bytes()
