"""Regenerate the small data samples shipped in src/lorakit/samples/ from the full data sets.

Usage: python scripts/make_samples.py [FULL_DATA_DIR]   (default: ../shared/data next to the repository)

The draw is seeded and the source files are checked against their published sha256, so the same
inputs always give byte-identical samples. Each sample keeps the file names and columns of its source,
so the loaders in lorakit.train.data read a sample and the full data the same way.
"""

from __future__ import annotations

import csv
import hashlib
import random
import sys
from collections import Counter
from pathlib import Path

from lorakit.train.references import central_reference

SEED = 20240501
TRAIN_SIZE = 2000
E2E_TRAIN_MRS = 2600  # one row each; one epoch at batch 8 = 325 steps: ~14 minutes on 2 cores
E2E_FIRST_DRAW = 1000  # the first sample's random training rows, drawn before the evaluation MRs
E2E_EVAL_MRS = 100

REPO = Path(__file__).resolve().parent.parent
OUT = REPO / "src" / "lorakit" / "samples"

# sha256 as listed in the SOURCE.md files of the full data.
SOURCE_SHA256 = {
    "e2e/trainset.csv": "f27d48df45815288ab15619d47a79028c300fbb7f42e373668aba0b98c1d57c6",
    "e2e/devset.csv": "fc26b78cdb849c80545f513b223d1e051138b43882eeb79e3eb153e689c864f9",
    "e2e/testset_w_refs.csv": "edc8db685e39bb9824d5bd70c18b1c9b0412d14b527aa960e2d1c8251ee15ccd",
    "glue/SST-2/train.tsv": "48eac26399f8456935f81dd9e3a745c1430adb6c62e233ccfe22db4a0d15d1d1",
    "glue/SST-2/dev.tsv": "54a9c12c77e402fc14d6a66a506f24d999f596b0176eb777c972cccc2f9cc4b0",
    "glue/MRPC/dev.tsv": "9e8f284788040f7c9ecde2e1b3c07237c756f926bd9ef8548ef5d34b56f69f17",
    "glue/MRPC/dev_ids.tsv": "971d7767d81b997fd9060ade0ec23c4fc31cbb226a55d1bd4a1bac474eb81dc7",
    "glue/MRPC/msr_paraphrase_train.txt": "60a9b09084528f0673eedee2b69cb941920f0b8cd0eeccefc464a98768457f89",
}


def check_sources(root: Path) -> None:
    for rel, expected in SOURCE_SHA256.items():
        digest = hashlib.sha256((root / rel).read_bytes()).hexdigest()
        if digest != expected:
            sys.exit(f"{root / rel}: sha256 {digest} differs from the published {expected}")


def read_csv(path: Path) -> tuple[list[str], list[list[str]]]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = list(csv.reader(f))
    return rows[0], rows[1:]


def write_csv(path: Path, header: list[str], rows: list[list[str]]) -> None:
    with path.open("w", encoding="utf-8", newline="") as f:
        writer = csv.writer(f, lineterminator="\n")
        writer.writerow(header)
        writer.writerows(rows)


def tsv_lines(path: Path) -> tuple[str, list[str]]:
    # GLUE files: raw tab-separated lines, some with a BOM and unbalanced quotes, so no csv parsing.
    lines = path.read_text(encoding="utf-8-sig").splitlines()
    return lines[0], [line for line in lines[1:] if line]


def write_lines(path: Path, header: str, lines: list[str]) -> None:
    path.write_text("\n".join([header, *lines]) + "\n", encoding="utf-8")


def draw(rng: random.Random, items: list, k: int) -> list:
    """k items drawn without replacement, kept in their source order."""
    picked = sorted(rng.sample(range(len(items)), k))
    return [items[i] for i in picked]


def e2e_by_mr(rows: list[list[str]], rng: random.Random, k: int) -> list[list[str]]:
    """All rows of k randomly drawn meaning representations."""
    mrs = list(dict.fromkeys(row[0] for row in rows))
    keep = set(draw(rng, mrs, k))
    return [row for row in rows if row[0] in keep]


def attributes(mr: str) -> int:
    """How many attributes an E2E meaning representation gives ("name[Aromi], food[Italian]": 2)."""
    return mr.count("[")


def e2e_central_rows(
    rows: list[list[str]], rng: random.Random, mrs: int, like: list[list[str]] | None = None
) -> list[list[str]]:
    """`mrs` distinct meaning representations of `rows` ([mr, ref]), each once with its central reference, in
    source order. With `like`, as many of each attribute count as its share among the MRs of `like` asks for
    (at most as many as `rows` has, so the sample may come out smaller); else drawn uniformly."""
    grouped: dict[str, list[str]] = {}
    for mr, ref in rows:
        grouped.setdefault(mr, []).append(ref)
    if like is None:
        drawn = set(rng.sample(sorted(grouped), mrs))
    else:
        wanted = Counter(attributes(mr) for mr in dict.fromkeys(mr for mr, _ in like))
        drawn = set()
        for count, share in sorted(wanted.items()):
            pool = sorted(mr for mr in grouped if attributes(mr) == count)
            drawn |= set(rng.sample(pool, min(len(pool), round(mrs * share / wanted.total()))))
    return [[mr, central_reference(refs)] for mr, refs in grouped.items() if mr in drawn]


def sample_rng(name: str) -> random.Random:
    """The generator sample `name` is drawn with: one per data set, so regenerating one never shifts the others."""
    return random.Random(f"{SEED}-{name}")


def e2e_random_rows(train: list[list[str]], rng: random.Random, size: int) -> list[list[str]]:
    """`size` random training rows, as the sample was drawn before the central one: E2E_FIRST_DRAW rows from
    `rng` (the sample's first version), the rest from their own generator; a larger `size` keeps every row of
    a smaller one (`random.sample` draws its indices one by one, so a longer draw starts with the shorter one)."""
    first = sorted(rng.sample(range(len(train)), E2E_FIRST_DRAW))  # as `draw`, so rng moves on as it always did
    rest = sorted(set(range(len(train))) - set(first))
    more = sample_rng("e2e-more").sample(rest, size - E2E_FIRST_DRAW)
    return [train[i] for i in sorted(first + more)]


def make_e2e(src: Path, dst: Path, rng: random.Random) -> None:
    """The E2E sample: E2E_TRAIN_MRS random training MRs, each once with its central reference
    (`e2e_central_rows`), and E2E_EVAL_MRS development and test MRs with all of their references."""
    header, train = read_csv(src / "trainset.csv")
    write_csv(dst / "trainset.csv", header, e2e_central_rows(train, central_rng(E2E_TRAIN_MRS), E2E_TRAIN_MRS))
    header, dev = read_csv(src / "devset.csv")
    e2e_random_rows(train, rng, E2E_FIRST_DRAW)  # the first sample's draw: the evaluation MRs come after it
    write_csv(dst / "devset.csv", header, e2e_by_mr(dev, rng, E2E_EVAL_MRS))
    header, test = read_csv(src / "testset_w_refs.csv")
    write_csv(dst / "testset_w_refs.csv", header, e2e_by_mr(test, rng, E2E_EVAL_MRS))


def central_rng(mrs: int) -> random.Random:
    """The generator a central sample of `mrs` MRs is drawn with (the validation runs drew theirs so too)."""
    return random.Random(f"central-{mrs}")


def make_sst2(src: Path, dst: Path, rng: random.Random) -> None:
    header, train = tsv_lines(src / "train.tsv")
    write_lines(dst / "train.tsv", header, draw(rng, train, TRAIN_SIZE))
    header, dev = tsv_lines(src / "dev.tsv")
    write_lines(dst / "dev.tsv", header, dev)


def make_mrpc(src: Path, dst: Path, rng: random.Random) -> None:
    # GLUE's train split is msr_paraphrase_train.txt minus the dev pairs; the shipped train.tsv
    # lost one pair (see the source notes), so rebuild it the GLUE way before drawing.
    dev_ids = {tuple(line.split("\t")) for line in (src / "dev_ids.tsv").read_text().splitlines() if line}
    header, pairs = tsv_lines(src / "msr_paraphrase_train.txt")
    train = [line for line in pairs if tuple(line.split("\t")[1:3]) not in dev_ids]
    write_lines(dst / "train.tsv", header, draw(rng, train, TRAIN_SIZE))
    header, dev = tsv_lines(src / "dev.tsv")
    write_lines(dst / "dev.tsv", header, dev)


def main() -> None:
    root = Path(sys.argv[1]) if len(sys.argv) > 1 else REPO.parent / "shared" / "data"
    check_sources(root)
    jobs = [(make_e2e, "e2e", "e2e"), (make_sst2, "glue/SST-2", "sst2"), (make_mrpc, "glue/MRPC", "mrpc")]
    for make, src, name in jobs:
        dst = OUT / name
        dst.mkdir(parents=True, exist_ok=True)
        make(root / src, dst, sample_rng(name))
        print(f"{name}: {', '.join(sorted(p.name for p in dst.iterdir()))}")


if __name__ == "__main__":
    main()
