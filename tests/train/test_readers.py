"""Reading local files: header-less delimited files named by `columns`, and the errors of a row that does not
fit its columns, checked against the lines the test writes."""

from pathlib import Path

import pytest

from lorakit.train.data import ClassExample, DataError, load_data, read_records

# CoLA's train.tsv: source, label, original mark, sentence; no header row.
COLA_LINES = [
    "gj04\t1\t\tOur friends won't buy this analysis, let alone the next one we propose.",
    "gj04\t0\t*\tThe more we study verbs, the crazier they get get.",
    'cj99\t1\t\tThe "sailors" rode the breeze clear of the rocks.',
]
COLA_COLUMNS = ["source", "label", "mark", "sentence"]


def write(path: Path, lines: list[str]) -> Path:
    path.write_text("\n".join(lines) + "\n")
    return path


def test_header_less_tsv_reads_every_line_as_a_row(tmp_path):
    path = write(tmp_path / "train.tsv", COLA_LINES)
    records = read_records(path, COLA_COLUMNS)
    expected = [dict(zip(COLA_COLUMNS, line.split("\t"))) for line in COLA_LINES]
    assert records == expected  # the first line is data, quotes are kept as written
    data = load_data(str(path), task="seq-cls", columns=COLA_COLUMNS, input_field="sentence")
    assert data.examples[1] == ClassExample("The more we study verbs, the crazier they get get.", None, 0)
    assert data.label_names == ("0", "1")


def test_header_less_csv(tmp_path):
    path = write(tmp_path / "pairs.csv", ['"Who, then?",Ann', "Where?,home"])
    assert read_records(path, ["question", "answer"]) == [
        {"question": "Who, then?", "answer": "Ann"},
        {"question": "Where?", "answer": "home"},
    ]


def test_a_line_with_another_field_count_names_file_line_and_counts(tmp_path):
    path = write(tmp_path / "train.tsv", [COLA_LINES[0], "gj04\t1\tonly three", COLA_LINES[2]])
    with pytest.raises(DataError) as caught:
        read_records(path, COLA_COLUMNS)
    assert str(caught.value) == f"{path}:2: 3 fields, but 4 --columns names (source, label, mark, sentence)"
    headed = write(tmp_path / "headed.tsv", ["text\tlabel", "fine\tpos", "one\ttwo\tthree"])
    with pytest.raises(DataError, match=r"headed.tsv:3: 3 fields, but 2 header fields \(text, label\)"):
        read_records(headed)


def test_columns_apply_to_delimited_files_only(tmp_path):
    path = write(tmp_path / "d.jsonl", ['{"text": "a", "label": 1}'])
    with pytest.raises(DataError, match="header-less .csv or .tsv file, not of a .jsonl file"):
        read_records(path, ["text", "label"])
