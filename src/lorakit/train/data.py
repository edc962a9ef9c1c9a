"""Data sets for training and evaluation: the built-in ones, and turning the rows of any other into examples.

Sources are the built-in samples shipped in lorakit/samples (`e2e`, `sst2`, `mrpc`; `<name>-full` reads the
complete originals), local jsonl/json/csv/tsv files, and `hf:<id>` data sets through `datasets.load_dataset`
(reading those: `train/readers.py`). Generation tasks give `Example`s (chat rows with `messages`:
`train/chat.py`), classification and regression tasks `ClassExample`s (their types: `train/examples.py`).
Tokenizing them is `train/encoding.py`; this module re-exports all of them, so `lorakit.train.data` is the
one import for everything about data.
"""

from __future__ import annotations

import csv
import os
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from importlib.resources import files
from pathlib import Path
from typing import Any

from .chat import MESSAGES_FIELD, conversation_example
from .encoding import (
    PROMPT_FORMATS,
    Collator,
    apply_prompt_format,
    encode_causal,
    encode_classification,
    encode_prompt,
    format_prompt,
)
from .examples import (
    CLASSIFICATION,
    GENERATION,
    IGNORE_INDEX,
    REGRESSION,
    TASKS,
    ClassExample,
    DataError,
    DataSplit,
    Example,
)
from .readers import LOCAL_SUFFIXES, load_records, read_hub_records, read_records

INPUT_FIELDS = ("input", "text", "sentence", "prompt", "instruction", "sentence1")
TARGET_FIELDS = ("target", "output", "label", "response", "completion")
PAIR_FIELDS = ("text_pair", "sentence2")

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
    prompt_format: str = "chat"  # the --prompt-format and --template a run on it takes unless told
    template: str | None = None  # (None: the loader's own prompt)


BUILTIN_DATASETS: dict[str, _Builtin] = {
    "e2e": _Builtin(
        GENERATION,
        "e2e",
        {"train": "trainset.csv", "validation": "devset.csv", "test": "testset_w_refs.csv"},
        # One fixed task: the chat template's turns and an instruction would be two thirds of every row.
        prompt_format="plain",
        template="{mr}",
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


def prompt_defaults(spec: str) -> dict[str, str | None]:
    """The prompt format and template a run on `spec` takes unless told: the built-in data set's, else the chat
    template and no template."""
    builtin = BUILTIN_DATASETS.get(spec.removesuffix("-full"))
    if builtin is None:
        return {"prompt_format": "chat", "template": None}
    return {"prompt_format": builtin.prompt_format, "template": builtin.template}


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


def _read_e2e(path: Path, split: str, template: str | None) -> list[Example]:
    with path.open(encoding="utf-8", newline="") as f:
        rows = [(row["mr"], row["ref"]) for row in csv.DictReader(f)]
    refs: dict[str, list[str]] = {}
    for mr, ref in rows:
        refs.setdefault(mr, []).append(ref)
    prompts = {mr: e2e_prompt(mr) if template is None else _fill(template, {"mr": mr}, str(path)) for mr in refs}
    if split == "train":
        return [Example(prompts[mr], ref, refs[mr]) for mr, ref in rows]
    # Evaluation scores one output per meaning representation against all its references.
    return [Example(prompts[mr], group[0], group) for mr, group in refs.items()]


def _mrpc_train_rows(folder: Path) -> list[dict[str, str]]:
    # The circulating GLUE train.tsv lacks one pair; where the original files exist, rebuild
    # the split as GLUE defines it: the MSR train file minus the dev pairs.
    original, dev_ids = folder / "msr_paraphrase_train.txt", folder / "dev_ids.tsv"
    if not (original.exists() and dev_ids.exists()):
        return _read_glue_tsv(folder / "train.tsv")
    dev = {tuple(line.split("\t")) for line in dev_ids.read_text().splitlines() if line}
    return [row for row in _read_glue_tsv(original) if (row["#1 ID"], row["#2 ID"]) not in dev]


def load_builtin(
    name: str, split: str = "train", data_dir: str | Path | None = None, template: str | None = None
) -> DataSplit:
    """A split ("train", "validation", "test" for e2e) of a built-in data set, from data_dir or the shipped sample.

    template (e2e only) writes the prompt from the field `mr`, e.g. "{mr}"; by default the prompt is
    `E2E_INSTRUCTION` followed by the meaning representation."""
    spec = BUILTIN_DATASETS.get(name)
    if spec is None:
        raise DataError(f"no built-in data set '{name}'; built-in: {', '.join(BUILTIN_DATASETS)}")
    if split not in spec.files:
        raise DataError(f"data set '{name}' has no split '{split}'; it has: {', '.join(spec.files)}")
    folder = Path(data_dir).expanduser() if data_dir is not None else sample_dir(name)
    path = folder / spec.files[split]
    if not path.is_file():
        raise DataError(f"data set '{name}': file not found: {path}")
    if template is not None and spec.task != GENERATION:
        raise DataError(f"data set '{name}' is for {spec.task}, which takes no prompt template")
    if name == "e2e":
        return DataSplit(GENERATION, _read_e2e(path, split, template))
    if name == "sst2":
        rows = _read_glue_tsv(path)
        examples = [ClassExample(row["sentence"].strip(), None, int(row["label"])) for row in rows]
    else:
        rows = _mrpc_train_rows(folder) if split == "train" else _read_glue_tsv(path)
        examples = [ClassExample(row["#1 String"], row["#2 String"], int(row["Quality"])) for row in rows]
    return DataSplit(CLASSIFICATION, examples, spec.label_names)


# ---------------------------------------------------------------- local files and hub data sets


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
    columns: Sequence[str] | None = None,
    hub_options: Mapping[str, Any] | None = None,
) -> DataSplit:
    """Load one split of a data set given by spec.

    spec: a built-in name (`e2e`, `sst2`, `mrpc`: the shipped sample, or data_dir when given), `<name>-full`
    (the complete data: data_dir, else $LORAKIT_DATA/<subdir>, else ../shared/data/<subdir>), a local file
    (split is ignored; columns name the fields of a header-less .csv/.tsv), or `hf:<id>` / `<owner>/<name>`
    for datasets.load_dataset with hub_options.
    task is "causal-lm" (default), "seq-cls" or "regression" for files and hub data; built-ins know their own.
    The fields and label_names apply to files and hub data (see `records_to_split`), the template also to e2e.
    """
    name = spec.removesuffix("-full")
    if name in BUILTIN_DATASETS:
        if task is not None and task != BUILTIN_DATASETS[name].task:
            raise DataError(f"data set '{name}' is for task '{BUILTIN_DATASETS[name].task}', not '{task}'")
        folder = data_dir if data_dir is not None or name == spec else full_data_dir(name)
        return load_builtin(name, split, folder, template)
    records, hub_names = load_records(
        spec, split, columns=columns, hub_options=hub_options, builtin_names=tuple(BUILTIN_DATASETS)
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

    Rows holding `messages` (and no input field or template given) are chat conversations (`train/chat.py`).
    Otherwise the input is `template.format(**row)` when a template is given, else input_field, else the
    first of INPUT_FIELDS present; rows with `instruction` (and no explicit input field) read as Alpaca-style
    instruction + optional input. The target (a text, a label for seq-cls, a number for regression) is
    target_field, else the first of TARGET_FIELDS present. seq-cls and regression also take pair_field
    (default: the first of PAIR_FIELDS present, else none). Labels are ids, or names mapped through
    label_names (default: sorted names).
    """
    if task not in TASKS:
        raise DataError(f"unknown task '{task}'; expected {', '.join(TASKS)}")
    if not records:
        raise DataError(f"{source}: the data set is empty")
    fields = list(records[0])
    if MESSAGES_FIELD in fields and template is None and input_field is None:
        if task != GENERATION:
            raise DataError(f"{source}: chat data ('{MESSAGES_FIELD}') is for task {GENERATION}, not {task}")
        chats = [
            conversation_example(row.get(MESSAGES_FIELD), f"{source}: record {n}") for n, row in enumerate(records, 1)
        ]
        return DataSplit(GENERATION, chats)
    target = pick_field(fields, target_field, TARGET_FIELDS, "target", source)
    alpaca = template is None and input_field is None and "instruction" in fields
    text = None if template is not None or alpaca else pick_field(fields, input_field, INPUT_FIELDS, "input", source)
    pair = None
    if task != GENERATION and (pair_field or any(name in fields for name in PAIR_FIELDS)):
        pair = pick_field(fields, pair_field, PAIR_FIELDS, "pair", source)

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
    if task == REGRESSION:
        values = [_number(t, number, source) for number, t in enumerate(targets, 1)]
        return DataSplit(REGRESSION, [ClassExample(*row) for row in zip(inputs, pairs, values)])
    ids, names = _label_ids([t.strip() for t in targets], label_names, source)
    return DataSplit(CLASSIFICATION, [ClassExample(*row) for row in zip(inputs, pairs, ids)], names)


def _number(value: str, number: int, source: str) -> float:
    try:
        return float(value)
    except ValueError:
        raise DataError(f"{source}: record {number} has target {value!r}, not a number (task {REGRESSION})") from None


def _value(record: Mapping[str, Any], field: str, number: int, source: str) -> str:
    if record.get(field) is None:
        raise DataError(f"{source}: record {number} has no value for field '{field}'")
    return str(record[field])


def pick_field(fields: list[str], explicit: str | None, defaults: Sequence[str], role: str, source: str) -> str:
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
    "MESSAGES_FIELD",
    "PAIR_FIELDS",
    "REGRESSION",
    "TARGET_FIELDS",
    "TASKS",
    "ClassExample",
    "PROMPT_FORMATS",
    "Collator",
    "apply_prompt_format",
    "prompt_defaults",
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
    "load_records",
    "pick_field",
    "read_hub_records",
    "read_records",
    "records_to_split",
    "sample_dir",
]
