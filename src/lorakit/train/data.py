"""Data sets for training and evaluation: reading them and turning their rows into examples.

Sources are the built-in samples shipped in lorakit/samples (`e2e`, `sst2`, `mrpc`; `<name>-full` reads the
complete originals), local jsonl/json/csv/tsv files, and `hf:<id>` data sets through `datasets.load_dataset`.
Generation tasks give `Example`s, classification tasks `ClassExample`s (their types: `train/examples.py`).
Tokenizing them is `train/encoding.py`; this module re-exports both, so `lorakit.train.data` is the one
import for everything about data.
"""

from __future__ import annotations

import csv
import json
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from .encoding import Collator, encode_causal, encode_classification, encode_prompt, format_prompt
from .examples import CLASSIFICATION, GENERATION, IGNORE_INDEX, ClassExample, DataError, DataSplit, Example

INPUT_FIELDS = ("input", "text", "sentence", "prompt", "instruction", "sentence1")
TARGET_FIELDS = ("target", "output", "label", "response", "completion")
PAIR_FIELDS = ("text_pair", "sentence2")
LOCAL_SUFFIXES = (".jsonl", ".json", ".csv", ".tsv")

E2E_INSTRUCTION = (
    "Describe this restaurant in one or two sentences, using every attribute of the meaning representation: "
)


# ---------------------------------------------------------------- built-in data sets


@dataclass(frozen=True)
class _Builtin:
    task: str
    full_subdir: str  # its folder inside the full-data root (the ../shared/data layout)
    files: Mapping[str, str]  # split -> file name, identical in the sample and the full data
    label_names: tuple[str, ...] = ()


BUILTIN_DATASETS: dict[str, _Builtin] = {
    "e2e": _Builtin(
        GENERATION, "e2e", {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"}
    ),
    "sst2": _Builtin(
        CLASSIFICATION, "glue/SST-2", {"train": "train.tsv", "validation": "dev.tsv"}, ("negative", "positive")
    ),
    "mrpc": _Builtin(
        CLASSIFICATION,
        "glue/MRPC",
        {"train": "train.tsv", "validation": "dev.tsv"},
        ("not_equivalent", "equivalent"),
    ),
}


def sample_dir(name: str) -> Path:
    """Folder of a built-in data set's shipped sample."""
    return Path(str(files("lorakit") / "samples" / name))


def full_data_dir(name: str) -> Path:
    """Folder of a built-in data set's complete data, in the ../shared/data layout: under $LORAKIT_DATA,
    else under ../shared/data relative to the working directory."""
    root = Path(os.environ.get("LORAKIT_DATA") or Path("..") / "shared" / "data").expanduser()
    folder = root / BUILTIN_DATASETS[name].full_subdir
    if not folder.is_dir():
        raise DataError(
            f"no full '{name}' data at {folder}; set LORAKIT_DATA to the folder that holds it, or pass data_dir"
        )
    return folder


def e2e_prompt(mr: str) -> str:
    """The instruction given to the model for one E2E meaning representation."""
    return E2E_INSTRUCTION + mr


def _read_glue_tsv(path: Path) -> list[dict[str, str]]:
    # GLUE files may start with a BOM and hold unbalanced quotes, hence utf-8-sig and no quote handling.
    with path.open(encoding="utf-8-sig", newline="") as f:
        return list(csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE))


def _read_e2e(path: Path, split: str) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = [(row["mr"], row["ref"]) for row in csv.DictReader(f)]
    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    if split == "train":
        return [Example(e2e_prompt(mr), ref, refs[mr]) for mr, ref in rows]
    # Evaluation scores one output per meaning representation against all its references.
    return [Example(e2e_prompt(mr), group[0], group) for mr, group in refs.items()]


def _mrpc_train_rows(folder: Path) -> list[dict[str, str]]:
    # The circulating GLUE train.tsv lacks one pair; where the original files exist, rebuild
    # the split as GLUE defines it: the MSR train file minus the dev pairs.
    original, dev_ids = folder / "msr_paraphrase_train.txt", folder / "dev_ids.tsv"
    if not (original.exists() and dev_ids.exists()):
        return _read_glue_tsv(folder / "train.tsv")
    dev = {tuple(line.split("\t")) for line in dev_ids.read_text().splitlines() if line}
    return [row for row in _read_glue_tsv(original) if (row["#1 ID"], row["#2 ID"]) not in dev]


def load_builtin(name: str, split: str = "train", data_dir: str | Path | None = None) -> DataSplit:
    """A split ("train", "validation", "test" for e2e) of a built-in data set, from data_dir or the shipped sample."""
    spec = BUILTIN_DATASETS.get(name)
    if spec is None:
        raise DataError(f"no built-in data set '{name}'; built-in: {', '.join(BUILTIN_DATASETS)}")
    if split not in spec.files:
        raise DataError(f"data set '{name}' has no split '{split}'; it has: {', '.join(spec.files)}")
    folder = Path(data_dir).expanduser() if data_dir is not None else sample_dir(name)
    path = folder / spec.files[split]
    if not path.is_file():
        raise DataError(f"data set '{name}': file not found: {path}")
    if name == "e2e":
        return DataSplit(GENERATION, _read_e2e(path, split))
    if name == "sst2":
        rows = _read_glue_tsv(path)
        examples = [ClassExample(row["sentence"].strip(), None, int(row["label"])) for row in rows]
    else:
        rows = _mrpc_train_rows(folder) if split == "train" else _read_glue_tsv(path)
        examples = [ClassExample(row["#1 String"], row["#2 String"], int(row["Quality"])) for row in rows]
    return DataSplit(CLASSIFICATION, examples, spec.label_names)


# ---------------------------------------------------------------- local files and hub data sets


def read_records(path: str | Path) -> list[dict[str, Any]]:
    """The rows of a local .jsonl, .json (a list of objects), .csv or .tsv file, as dicts."""
    path = Path(path).expanduser()
    if not path.is_file():
        raise DataError(f"data file not found: {path}")
    suffix = path.suffix.lower()
    if suffix not in LOCAL_SUFFIXES:
        raise DataError(f"{path}: unsupported file type '{suffix}'; use one of {', '.join(LOCAL_SUFFIXES)}")
    with path.open(encoding="utf-8-sig", newline="") as f:
        if suffix in (".csv", ".tsv"):
            # TSV convention: fields hold no tabs or newlines, so quotes are plain text.
            tsv = suffix == ".tsv"
            reader = csv.DictReader(f, delimiter="\t", quoting=csv.QUOTE_NONE) if tsv else csv.DictReader(f)
            records = list(reader)
        elif suffix == ".json":
            records = _parse_json(f.read(), str(path))
        else:
            records = [_parse_json(line, f"{path}:{number}") for number, line in enumerate(f, 1) if line.strip()]
    if not isinstance(records, list) or not all(isinstance(record, dict) for record in records):
        raise DataError(f"{path}: expected records, i.e. objects with named fields")
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


def load_data(
    spec: str,
    split: str = "train",
    task: str | None = None,
    *,
    data_dir: str | Path | None = None,
    input_field: str | None = None,
    target_field: str | None = None,
    pair_field: str | None = None,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
    hub_options: Mapping[str, Any] | None = None,
) -> DataSplit:
    """Load one split of a data set given by spec.

    spec: a built-in name (`e2e`, `sst2`, `mrpc`: the shipped sample, or data_dir when given), `<name>-full`
    (the complete data: data_dir, else $LORAKIT_DATA/<subdir>, else ../shared/data/<subdir>), a local file
    (split is ignored), or `hf:<id>` / `<owner>/<name>` for datasets.load_dataset with hub_options.
    task is "causal-lm" (default) or "seq-cls" for files and hub data; built-ins know their own.
    The fields, template and label_names apply to files and hub data; see `records_to_split`.
    """
    name = spec.removesuffix("-full")
    if name in BUILTIN_DATASETS:
        if task is not None and task != BUILTIN_DATASETS[name].task:
            raise DataError(f"data set '{name}' is for task '{BUILTIN_DATASETS[name].task}', not '{task}'")
        folder = data_dir if data_dir is not None or name == spec else full_data_dir(name)
        return load_builtin(name, split, folder)

    hub_names: tuple[str, ...] = ()
    path = Path(spec).expanduser()
    if spec.startswith("hf:"):
        records, hub_names = read_hub_records(spec[3:], split, hub_options)
    elif path.exists() or path.suffix.lower() in LOCAL_SUFFIXES:
        records = read_records(path)
    elif spec.count("/") == 1 and not spec.startswith((".", "/", "~")):
        records, hub_names = read_hub_records(spec, split, hub_options)
    else:
        raise DataError(
            f"'{spec}' is not a built-in data set ({', '.join(BUILTIN_DATASETS)}), an existing file, "
            "or a hub data set (write hf:<id>)"
        )
    return records_to_split(
        records,
        task or GENERATION,
        source=spec,
        input_field=input_field,
        target_field=target_field,
        pair_field=pair_field,
        template=template,
        label_names=label_names or hub_names or None,
    )


def records_to_split(
    records: Sequence[Mapping[str, Any]],
    task: str,
    *,
    source: str = "data",
    input_field: str | None = None,
    target_field: str | None = None,
    pair_field: str | None = None,
    template: str | None = None,
    label_names: Sequence[str] | None = None,
) -> DataSplit:
    """Turn rows into examples.

    The input is `template.format(**row)` when a template is given, else input_field, else the first of
    INPUT_FIELDS present; rows with `instruction` (and no explicit input field) read as Alpaca-style
    instruction + optional input. The target (a text, or a label for seq-cls) is target_field, else the
    first of TARGET_FIELDS present. seq-cls also takes pair_field (default: the first of PAIR_FIELDS
    present, else none). Labels are ids, or names mapped through label_names (default: sorted names).
    """
    if task not in (GENERATION, CLASSIFICATION):
        raise DataError(f"unknown task '{task}'; expected {GENERATION} or {CLASSIFICATION}")
    if not records:
        raise DataError(f"{source}: the data set is empty")
    fields = list(records[0])
    target = _pick_field(fields, target_field, TARGET_FIELDS, "target", source)
    alpaca = template is None and input_field is None and "instruction" in fields
    text = None if template is not None or alpaca else _pick_field(fields, input_field, INPUT_FIELDS, "input", source)
    pair = None
    if task == CLASSIFICATION and (pair_field or any(name in fields for name in PAIR_FIELDS)):
        pair = _pick_field(fields, pair_field, PAIR_FIELDS, "pair", source)

    inputs, pairs, targets = [], [], []
    for number, record in enumerate(records, 1):
        if template is not None:
            inputs.append(_fill(template, record, source))
        elif alpaca:
            extra = record.get("input") or ""
            inputs.append(_value(record, "instruction", number, source) + (f"\n\n{extra}" if extra else ""))
        elif text is not None:
            inputs.append(_value(record, text, number, source))
        pairs.append(_value(record, pair, number, source) if pair else None)
        targets.append(_value(record, target, number, source))

    if task == GENERATION:
        return DataSplit(GENERATION, [Example(p, t, [t]) for p, t in zip(inputs, targets)])
    ids, names = _label_ids([t.strip() for t in targets], label_names, source)
    return DataSplit(CLASSIFICATION, [ClassExample(*row) for row in zip(inputs, pairs, ids)], names)


def _value(record: Mapping[str, Any], field: str, number: int, source: str) -> str:
    if record.get(field) is None:
        raise DataError(f"{source}: record {number} has no value for field '{field}'")
    return str(record[field])


def _pick_field(fields: list[str], explicit: str | None, defaults: Sequence[str], role: str, source: str) -> str:
    if explicit is not None:
        if explicit not in fields:
            raise DataError(f"{source}: no {role} field '{explicit}'; fields present: {', '.join(fields)}")
        return explicit
    for name in defaults:
        if name in fields:
            return name
    raise DataError(
        f"{source}: no {role} field among {', '.join(defaults)}; fields present: {', '.join(fields)} "
        f"(name one with {role}_field)"
    )


def _fill(template: str, record: Mapping[str, Any], source: str) -> str:
    try:
        return template.format(**record)
    except KeyError as err:
        raise DataError(
            f"{source}: template field {err} is not in the data; fields present: {', '.join(record)}"
        ) from None
    except (IndexError, ValueError) as err:
        raise DataError(f"{source}: bad template {template!r}: {err}") from None


def _label_ids(values: list[str], label_names: Sequence[str] | None, source: str) -> tuple[list[int], tuple[str, ...]]:
    if label_names:
        names = tuple(label_names)
    elif all(v.lstrip("-").isdigit() for v in values):
        names = tuple(str(i) for i in range(max(map(int, values)) + 1))
    else:
        names = tuple(sorted(set(values)))
    index = {name: i for i, name in enumerate(names)}
    ids = []
    for number, v in enumerate(values, 1):
        label = index.get(v, int(v) if v.isdigit() else None)
        if label is None or label >= len(names):
            raise DataError(f"{source}: record {number} has label {v!r}, not one of: {', '.join(names)}")
        ids.append(label)
    return ids, names


__all__ = [
    "BUILTIN_DATASETS",
    "CLASSIFICATION",
    "E2E_INSTRUCTION",
    "GENERATION",
    "IGNORE_INDEX",
    "INPUT_FIELDS",
    "LOCAL_SUFFIXES",
    "PAIR_FIELDS",
    "TARGET_FIELDS",
    "ClassExample",
    "Collator",
    "DataError",
    "DataSplit",
    "Example",
    "e2e_prompt",
    "encode_causal",
    "encode_classification",
    "encode_prompt",
    "format_prompt",
    "full_data_dir",
    "load_builtin",
    "load_data",
    "read_hub_records",
    "read_records",
    "records_to_split",
    "sample_dir",
]
