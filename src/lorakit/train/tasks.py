"""Which task a run trains when it does not say (`--task`): the built-in data set's own; else a local file's
target column where it is unambiguous; else the built-in model's task; else generation.

A target column of numbers, some written with a fraction (3.8, 5.000), is regression, even on a built-in
classification model (a similarity score is no class). Integer labels, or a column named `label`, are
classification (two labels or more: multi-class) unless the model is a built-in causal LM. Text targets
under any other name are generation. Hub data sets are not read for this (they would be downloaded
twice); name their task with `--task`.
"""

from __future__ import annotations

import re
from collections.abc import Mapping, Sequence
from functools import lru_cache
from pathlib import Path
from typing import Any, NamedTuple

from ..models import BUILTIN_MODELS
from .data import BUILTIN_DATASETS, CLASSIFICATION, GENERATION, MESSAGES_FIELD, REGRESSION, TARGET_FIELDS, pick_field
from .examples import DataError
from .readers import is_hub_spec, read_records

INTEGER = re.compile(r"[+-]?\d+")


class TaskChoice(NamedTuple):
    task: str
    reason: str  # why, as the run prints it: "task: regression (the target column is numeric)"


def records_task(records: Sequence[Mapping[str, Any]], target_field: str | None = None) -> TaskChoice | None:
    """The task the rows' target column implies, or None when it implies none (text targets)."""
    if not records:
        return None
    fields = list(records[0])
    if MESSAGES_FIELD in fields:
        return TaskChoice(GENERATION, "the rows hold chat messages")
    try:
        target = pick_field(fields, target_field, TARGET_FIELDS, "target", "data")
    except DataError:
        return None
    values = [str(record[target]).strip() for record in records if record.get(target) is not None]
    if not values:
        return None
    if all(_is_number(v) for v in values) and not all(INTEGER.fullmatch(v) for v in values):
        return TaskChoice(REGRESSION, "the target column is numeric")
    if all(INTEGER.fullmatch(v) for v in values) or target == "label":
        return TaskChoice(CLASSIFICATION, f"the target column '{target}' holds {len(set(values))} labels")
    return None


def _is_number(text: str) -> bool:
    try:
        float(text)
    except ValueError:
        return False
    return text.lower() not in ("nan", "inf", "-inf", "+inf", "infinity", "-infinity")


@lru_cache(maxsize=4)
def _file_task(
    path: Path, stamp: tuple[int, int], columns: tuple[str, ...], target_field: str | None
) -> TaskChoice | None:
    """records_task of a file, read once per version of it (stamp: modification time and size)."""
    return records_task(read_records(path, columns or None), target_field)


def data_task(spec: str, target_field: str | None = None, columns: Sequence[str] | None = None) -> TaskChoice | None:
    """The task a local data file implies (None: it implies none, or it cannot be read: loading it later
    reports why)."""
    path = Path(spec).expanduser()
    if is_hub_spec(spec) or not path.is_file():
        return None
    stat = path.stat()
    try:
        return _file_task(path.resolve(), (stat.st_mtime_ns, stat.st_size), tuple(columns or ()), target_field)
    except DataError:
        return None


def choose_task(
    task: str | None,
    data: str,
    model: str | None,
    target_field: str | None = None,
    columns: Sequence[str] | None = None,
) -> TaskChoice:
    """The run's task: given, else inferred in the order the module docstring describes."""
    if task is not None:
        return TaskChoice(task, "given")
    builtin_data = BUILTIN_DATASETS.get(data.removesuffix("-full"))
    if builtin_data is not None:
        return TaskChoice(builtin_data.task, f"the built-in data set {data}")
    from_data = data_task(data, target_field, columns)
    if from_data is not None and from_data.task == REGRESSION:
        return from_data
    builtin_model = BUILTIN_MODELS.get(model or "")
    if builtin_model is not None:
        return TaskChoice(builtin_model.task, f"the built-in model {model}")
    return from_data or TaskChoice(GENERATION, "text targets")
