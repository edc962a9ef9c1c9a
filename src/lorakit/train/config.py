"""The options of a training job (`lorakit train`, its `--config` files and the run's train_config.yaml),
as nested sections (defined in `sections`): `dataset`, `base` (model and task), `tuning` (the method, with
LoRA's options in `tuning.lora`), `loop` (`LoopSettings`), `scoring` (metrics and decoding), `run` (output
folder, resume, processes) and `hardware` (device and precision).

Option names are unique across sections, so a flat mapping (`r: 4`) and a nested one
(`tuning: {lora: {r: 4}}`) read the same, and `RunConfig` also answers flat attribute names (`cfg.r`) and flat
keywords (`RunConfig(r=4)`). The command line is generated from the fields (`lorakit.cli.options`).
"""

from __future__ import annotations

import dataclasses
import os
from collections.abc import Callable, Iterator, Mapping
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any, NamedTuple, Union, cast, get_args, get_origin, get_type_hints

import yaml

from ..device import precision_name, resolve_device, resolve_precision
from ..models import BUILTIN_MODELS
from .data import CLASSIFICATION, GENERATION, PROMPT_FORMATS, REGRESSION, TASKS, prompt_defaults
from .long_rows import LONG_ROW_POLICIES
from .loop import LoopSettings
from .references import REFERENCE_CHOICES
from .sections import (
    DataSection,
    HardwareSection,
    MethodSection,
    ModelSection,
    RunSection,
    ScoringSection,
)
from .tasks import choose_task

DEFAULT_MODEL = {GENERATION: "smollm2-135m", CLASSIFICATION: "minilm-l6", REGRESSION: "minilm-l6"}
# Options that may differ between a run and its resumption.
RESUME_FREE = {
    "resume",
    "overwrite",
    "progress",
    "tensorboard",
    "eval_every",
    "save_every",
    "log_every",
    "keep_checkpoints",
    "distributed",
    "dist_timeout",
    "device",  # a run may continue on another device; its precision must stay the same
    "score_base",  # scoring, not training: a resumed run may skip what it has not scored yet
    "grad_checkpointing",  # the same gradients with or without: a run may continue with another memory budget
    "memory_limit",
}


# What runs saved before these options existed trained with.
OLDER_RUNS = {"precision": "fp32", "label_smoothing": 0.0}
CAUSAL_LM_LABEL_SMOOTHING = 0.1  # `lorakit train`'s default for causal-LM tasks (the LoRA paper's E2E setting)


class RunError(ValueError):
    """A training job that cannot start as configured; the message is one line for the user."""


def recipe_loop() -> LoopSettings:
    """The loop settings `lorakit train` starts from: LoopSettings' own, with the higher learning rate LoRA
    takes (2e-3: the best of 1e-3 and 2e-3 on E2E validation for the default run, docs/results.md) and a
    validation loss every 50 steps."""
    return LoopSettings(lr=2e-3, eval_every=50)


class Leaf(NamedTuple):
    """One option of a (nested) config: its field, type hint, current value and section path."""

    field: dataclasses.Field
    hint: Any
    value: Any
    path: tuple[str, ...]


def leaves(config: Any, path: tuple[str, ...] = ()) -> Iterator[Leaf]:
    """Every option of a config instance, depth first; a field holding a dataclass is a section."""
    hints = get_type_hints(type(config))
    for f in dataclasses.fields(config):
        value = getattr(config, f.name)
        if dataclasses.is_dataclass(value):
            yield from leaves(value, (*path, f.name))
        else:
            yield Leaf(f, hints[f.name], value, path)


def plain_type(hint: Any) -> Any:
    """`int` for `int | None`; the hint itself when it is not optional."""
    if get_origin(hint) in (Union, type(int | None)):
        args = [a for a in get_args(hint) if a is not type(None)]
        return args[0] if len(args) == 1 else hint
    return hint


def _checked(name: str, value: Any, hint: Any) -> Any:
    """The value when it fits the option's type (a YAML "1e-3", which YAML 1.1 reads as text, becomes a
    number); else a one-line error."""
    kind = plain_type(hint)
    if value is None:
        if type(None) not in get_args(hint):
            raise RunError(f"option {name} needs a value")
        return value
    if kind is float and isinstance(value, str):
        try:
            return float(value)
        except ValueError:
            pass
    fits = {
        bool: lambda v: isinstance(v, bool),
        int: lambda v: isinstance(v, int) and not isinstance(v, bool),
        float: lambda v: isinstance(v, (int, float)) and not isinstance(v, bool),
        str: lambda v: isinstance(v, str),
    }.get(kind, lambda v: isinstance(v, str) or (isinstance(v, list) and all(isinstance(x, str) for x in v)))
    if not fits(value):
        expected = {bool: "true or false", int: "an integer", float: "a number", str: "text"}.get(
            kind, "a list of names or a regex"
        )
        raise RunError(f"option {name} must be {expected}, got {value!r}")
    return value


@dataclass(init=False)
class RunConfig:
    """Every option of a training job, in sections. `RunConfig(r=4, data="sst2")` and `cfg.r` work by the
    options' (unique) names; `RunConfig(tuning=MethodSection(...))` by section."""

    dataset: DataSection = field(default_factory=DataSection)
    base: ModelSection = field(default_factory=ModelSection)
    tuning: MethodSection = field(default_factory=MethodSection)
    loop: LoopSettings = field(default_factory=recipe_loop)
    scoring: ScoringSection = field(default_factory=ScoringSection)
    run: RunSection = field(default_factory=RunSection)
    hardware: HardwareSection = field(default_factory=HardwareSection)

    def __init__(
        self,
        dataset: DataSection | None = None,
        base: ModelSection | None = None,
        tuning: MethodSection | None = None,
        loop: LoopSettings | None = None,
        scoring: ScoringSection | None = None,
        run: RunSection | None = None,
        hardware: HardwareSection | None = None,
        **options: Any,
    ) -> None:
        given = {
            "dataset": dataset,
            "base": base,
            "tuning": tuning,
            "loop": loop,
            "scoring": scoring,
            "run": run,
            "hardware": hardware,
        }
        for f in dataclasses.fields(self):
            default = cast(Callable[[], Any], f.default_factory)
            setattr(self, f.name, given[f.name] if given[f.name] is not None else default())
        if options:
            updated = self.updated(options)
            for f in dataclasses.fields(self):
                setattr(self, f.name, getattr(updated, f.name))

    def __getattr__(self, name: str) -> Any:
        # Only reached for names that are not sections: the flat view of the options.
        if name not in OPTIONS:
            raise AttributeError(f"{type(self).__name__!r} object has no attribute {name!r}")
        section: Any = self
        for part in OPTIONS[name].path:
            section = getattr(section, part)
        return getattr(section, name)

    @classmethod
    def from_sources(cls, file: str | os.PathLike | None = None, **overrides: Any) -> RunConfig:
        """Defaults, then the YAML file's keys (flat or in sections), then the overrides that are not None."""
        config = cls() if file is None else cls().updated(read_yaml(Path(file)))
        return config.updated({k: v for k, v in overrides.items() if v is not None})

    def updated(self, values: Mapping[str, Any]) -> RunConfig:
        """A copy with `values` set: flat option names, or sections holding them."""
        sections = {f.name: getattr(self, f.name) for f in dataclasses.fields(self)}
        for name, changes in nest(values).items():
            sections[name] = _replaced(sections[name], changes)
        return RunConfig(**sections)

    def to_dict(self, nested: bool = False) -> dict[str, Any]:
        """The options by name (as train_config.yaml holds them), or in their sections."""
        if nested:
            return dataclasses.asdict(self)
        return {leaf.field.name: _copy(leaf.value) for leaf in leaves(self)}

    def resolved(self) -> RunConfig:
        """Fill every default that depends on other options (precision `auto`: the one the device takes)."""
        precision = precision_name(resolve_precision(self.precision, resolve_device(self.device)))
        task = choose_task(self.task, self.data, self.model, self.target_field, self.columns).task
        if task not in TASKS:
            raise RunError(f"unknown task {task!r}; expected {', '.join(TASKS)}")
        if self.long_rows not in LONG_ROW_POLICIES:
            raise RunError(f"unknown --long-rows {self.long_rows!r}; expected {' or '.join(LONG_ROW_POLICIES)}")
        if self.references not in REFERENCE_CHOICES:
            raise RunError(f"unknown --references {self.references!r}; expected {' or '.join(REFERENCE_CHOICES)}")
        if self.references != "all" and task != GENERATION:
            raise RunError(f"--references {self.references} applies to {GENERATION} data, not {task}")
        prompts = prompt_defaults(self.data)
        prompt_format = self.prompt_format or prompts["prompt_format"]
        if prompt_format not in PROMPT_FORMATS:
            raise RunError(f"unknown --prompt-format {prompt_format!r}; expected {' or '.join(PROMPT_FORMATS)}")
        model = self.model or DEFAULT_MODEL[task]
        builtin = BUILTIN_MODELS.get(model)
        targets = self.target_modules or (list(builtin.target_modules) if builtin else None)
        name = f"{Path(self.data).stem}-{Path(model).name}"
        output = self.output or str(Path("runs") / name)
        values = {"task": task, "model": model, "target_modules": targets, "output": output, "precision": precision}
        values["prompt_format"] = prompt_format
        values["template"] = self.template if self.template is not None else prompts["template"]
        if self.label_smoothing is None:  # 0.1 raised E2E validation BLEU under beam search (docs/results.md)
            values["label_smoothing"] = CAUSAL_LM_LABEL_SMOOTHING if task == "causal-lm" else 0.0
        return self.updated(values)

    def changed_since(self, previous: Mapping[str, Any]) -> list[str]:
        """The options (other than RESUME_FREE) that differ from a previous run's saved options, flat or in
        sections; an option the file lacks (written before it existed) had its default."""
        before = {**RunConfig().to_dict(), **OLDER_RUNS, **flatten(previous)}
        return sorted(k for k, v in self.to_dict().items() if k not in RESUME_FREE and before[k] != v)


def _copy(value: Any) -> Any:
    return list(value) if isinstance(value, list) else value


def _replaced(section: Any, changes: dict[str, Any]) -> Any:
    """`section` with `changes` set, nested sections replaced in turn (never mutated: configs share them)."""
    values = {}
    for name, value in changes.items():
        current = getattr(section, name)
        values[name] = _replaced(current, value) if dataclasses.is_dataclass(current) else value
    return dataclasses.replace(section, **values)


class OptionPlace(NamedTuple):
    path: tuple[str, ...]  # the sections that hold the option, outermost first
    hint: Any


def _places(cls: type, path: tuple[str, ...] = ()) -> dict[str, OptionPlace]:
    places: dict[str, OptionPlace] = {}
    hints = get_type_hints(cls)
    for f in dataclasses.fields(cls):
        hint = hints[f.name]
        section = isinstance(hint, type) and dataclasses.is_dataclass(hint)
        found = _places(hint, (*path, f.name)) if section else {f.name: OptionPlace(path, hint)}
        clash = set(found) & set(places)
        if clash:  # flat keys would be ambiguous
            raise TypeError(f"option name(s) {sorted(clash)} appear in two sections")
        places.update(found)
    return places


OPTIONS: dict[str, OptionPlace] = _places(RunConfig)
SECTION_PATHS = {place.path[:i] for place in OPTIONS.values() for i in range(1, len(place.path) + 1)}
SECTION_NAMES = {path[-1] for path in SECTION_PATHS}


def nest(values: Mapping[str, Any]) -> dict[str, Any]:
    """Flat option names and sections as one mapping of checked values, nested as `RunConfig` is. Unknown
    names are refused, all of them in one line."""
    nested: dict[str, Any] = {}
    unknown: list[str] = []
    _nest_into(nested, values, (), unknown)
    if unknown:
        raise RunError(f"unknown option(s) {', '.join(sorted(unknown))}")
    return nested


def _nest_into(nested: dict[str, Any], values: Mapping[str, Any], path: tuple[str, ...], unknown: list[str]) -> None:
    for key, value in values.items():
        key = str(key).replace("-", "_")
        place = OPTIONS.get(key)
        if (*path, key) in SECTION_PATHS and isinstance(value, Mapping):
            _nest_into(nested, value, (*path, key), unknown)
        elif place is not None and place.path[: len(path)] == path:
            target = nested
            for part in place.path:
                target = target.setdefault(part, {})
            target[key] = _checked(key, value, place.hint)
        else:
            unknown.append(".".join((*path, key)))


def flatten(values: Mapping[str, Any]) -> dict[str, Any]:
    """A saved config's options by name, whether it holds them flat or in sections (unchecked: an old file may
    hold what this version no longer has)."""
    flat: dict[str, Any] = {}
    for key, value in values.items():
        if key in SECTION_NAMES and isinstance(value, Mapping):
            flat.update(flatten(value))
        else:
            flat[key] = value
    return flat


def read_yaml(path: Path) -> dict[str, Any]:
    """A YAML mapping of options; a missing file, bad YAML or another type is a one-line RunError."""
    if not path.is_file():
        raise RunError(f"config file not found: {path}")
    from ..safe_files import UnsafeFileError, read_bounded  # bounded: PyYAML takes minutes on a 20 MB file

    try:
        loaded = yaml.safe_load(read_bounded(path).decode("utf-8")) or {}
    except (yaml.YAMLError, UnicodeDecodeError, UnsafeFileError) as err:
        raise RunError(f"{path} is not valid YAML: {str(err).splitlines()[0]}") from None
    if not isinstance(loaded, dict):
        raise RunError(f"{path} must hold a mapping of option names to values")
    return loaded
