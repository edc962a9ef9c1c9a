"""Reading the rows of a data set that is not built in: local .jsonl, .json, .csv and .tsv files (with a
header row, or header-less with the column names given), and `hf:<id>` data sets through
`datasets.load_dataset`. Every reader returns the rows as dicts; turning them into examples is
`lorakit.train.data`'s.
"""

from __future__ import annotations

import csv
import json
from collections.abc import Mapping, Sequence
from pathlib import Path
from typing import Any

from .examples import DataError

LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")
DELIMITED_SUFFIXES = (".csv", ".tsv")


def read_records(path: str | Path, columns: Sequence[str] | None = None) -> list[dict[str, Any]]:
    """The rows of a local .jsonl, .json (a list of objects), .csv or .tsv file, as dicts.

    columns names the fields of a header-less .csv/.tsv file (every line is then a row); a line with another
    number of fields is an error naming the file, the line and both counts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")
    if columns and suffix not in DELIMITED_SUFFIXES:
        raise DataError(f"{path}: columns name the fields of a header-less .csv or .tsv file, not of a {suffix} file")
    with path.open(encoding="utf-8-sig", newline="") as f:
        if suffix in DELIMITED_SUFFIXES:
            # TSV convention: fields hold no tabs or newlines, so quotes are plain text.
            reader = csv.reader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if suffix == ".tsv" else csv.reader(f)
            records = _delimited_records(reader, columns, path)
        elif suffix == ".json":
            records = _parse_json(f.read(), str(path))
        else:
            records = [_parse_json(line, f"{path}:{number}") for number, line in enumerate(f, 1) if line.strip()]
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise DataError(f"{path}: expected records, i.e. objects with named fields")
    return records


def _delimited_records(reader: Any, columns: Sequence[str] | None, path: Path) -> list[dict[str, str]]:
    """Rows of a csv reader as dicts: named by `columns`, else by the first line (the header)."""
    names = list(columns) if columns else None
    records = []
    for row in reader:
        if not row:  # a blank line
            continue
        if names is None:
            names = row
            continue
        if len(row) != len(names):
            given = "--columns names" if columns else "header fields"
            raise DataError(
                f"{path}:{reader.line_num}: {len(row)} fields, but {len(names)} {given} ({', '.join(names)})"
            )
        records.append(dict(zip(names, row)))
    return records


def _parse_json(text: str, where: str) -> Any:
    try:
        return json.loads(text)
    except json.JSONDecodeError as err:
        raise DataError(f"{where}: invalid JSON: {err}") from None


def read_hub_records(
    dataset_id: str, split: str = "train", options: Mapping[str, Any] | None = None
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """Rows of a split loaded with `datasets.load_dataset(dataset_id, split=..., **options)`, and the
    label names when the data set declares a ClassLabel column (else empty)."""
    import datasets  # heavy import, needed only on this path

    try:
        dataset = datasets.load_dataset(dataset_id, split=split, **(options or {}))
    except (OSError, ValueError) as err:  # FileNotFoundError, ConnectionError and unknown splits among them
        raise DataError(f"could not load '{dataset_id}' split '{split}' with datasets: {err}".splitlines()[0]) from err
    names: tuple[str, ...] = ()
    for feature in dataset.features.values():
        if isinstance(feature, datasets.ClassLabel):
            names = tuple(feature.names)
    return dataset.to_list(), names


def is_hub_spec(spec: str) -> bool:
    """Whether a data spec that is not built in names a hub data set: `hf:<id>`, or `<owner>/<name>` that is
    no existing path and has no data file suffix."""
    if spec.startswith("hf:"):
        return True
    path = Path(spec).expanduser()
    local = path.exists() or path.suffix.lower() in LOCAL_SUFFIXES
    return not local and spec.count("/") == 1 and not spec.startswith((".", "/", "~"))


def load_records(
    spec: str,
    split: str = "train",
    *,
    columns: Sequence[str] | None = None,
    hub_options: Mapping[str, Any] | None = None,
    builtin_names: Sequence[str] = (),
) -> tuple[list[dict[str, Any]], tuple[str, ...]]:
    """The rows of a local file (split is ignored) or a hub data set, and the hub's label names (else empty).
    Anything else is an error listing what a spec may be, the built-in data sets' names among them."""
    path = Path(spec).expanduser()
    if is_hub_spec(spec):
        return read_hub_records(spec.removeprefix("hf:"), split, hub_options)
    if path.exists() or path.suffix.lower() in LOCAL_SUFFIXES:
        return read_records(path, columns), ()
    raise DataError(
        f"'{spec}' is not a built-in data set ({', '.join(builtin_names)}), an existing file, "
        "or a hub data set (write hf:<id>)"
    )
