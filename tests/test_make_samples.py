"""scripts/make_samples.py draws the shipped E2E sample again byte for byte from the complete data: distinct training
MRs, each with the reference that agrees most with its other references. The draws the validation experiments
compare it with: random rows (a larger draw keeps a smaller one's rows) and MRs in the development set's shares of
attribute counts."""

from __future__ import annotations

import csv
import sys
from collections import Counter
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


def test_a_larger_random_draw_keeps_the_rows_of_a_smaller_one(make_samples):
    _, train = make_samples.read_csv(FULL_E2E / "trainset.csv")
    smaller = make_samples.e2e_random_rows(train, make_samples.sample_rng("e2e"), 1800)
    larger = make_samples.e2e_random_rows(train, make_samples.sample_rng("e2e"), 2600)
    assert len(smaller) == 1800 and len(larger) == 2600
    assert not {tuple(r) for r in smaller} - {tuple(r) for r in larger}


def test_the_shipped_training_sample_has_distinct_mrs_with_one_of_their_references(make_samples):
    full = rows(FULL_E2E / "trainset.csv")
    shipped = rows(SHIPPED / "trainset.csv")
    assert len({mr for mr, _ in shipped}) == len(shipped)
    assert not set(shipped) - set(full)


def test_a_sample_like_the_development_set_takes_its_attribute_counts_while_the_training_set_has_them(make_samples):
    def counts(mrs):
        return Counter(mr.count("[") for mr in set(mrs))

    _, train = make_samples.read_csv(FULL_E2E / "trainset.csv")
    _, dev = make_samples.read_csv(FULL_E2E / "devset.csv")
    sample = make_samples.e2e_central_rows(train, make_samples.central_rng(2600), 2600, like=dev)
    wanted, available = counts(mr for mr, _ in dev), counts(mr for mr, _ in train)
    expected = {k: min(available[k], round(2600 * n / sum(wanted.values()))) for k, n in wanted.items()}
    assert counts(mr for mr, _ in sample) == expected
    assert expected[8] == available[8] < round(2600 * wanted[8] / sum(wanted.values()))  # all the 8-attribute MRs
