"""Typer options generated from config dataclass fields (`lorakit.train.config`'s convention): the help
comes from the field's metadata, the default shown from the config instance, the spellings from
"flags" (else `--field-name`, and `--x/--no-x` for a true/false field).

Every generated option defaults to None (not given), so that a command can tell a flag from a default
and let a `--config` file or a saved run fill what the command line leaves out.
"""

from __future__ import annotations

import inspect
from collections.abc import Callable, Iterable, Iterator
from typing import Annotated, Any, TypeVar, get_args, get_origin

import typer

from ..train.config import Leaf, leaves, plain_type
from .common import split_list

F = TypeVar("F", bound=Callable[..., Any])


def _shown(leaf: Leaf, shown: str | None) -> str | bool:
    """The default as the help shows it: a computed default's description, the flag that is on, or the value."""
    if shown is not None:
        return shown
    if "default_text" in leaf.field.metadata:
        return str(leaf.field.metadata["default_text"])
    value = leaf.value
    if isinstance(value, bool):
        return _flags(leaf)[0].split("/")[0 if value else 1]
    if value is None:
        return False
    return ",".join(value) if isinstance(value, list) else str(value)


def _flags(leaf: Leaf) -> tuple[str, ...]:
    if "flags" in leaf.field.metadata:
        return tuple(leaf.field.metadata["flags"])
    dashed = leaf.field.name.replace("_", "-")
    return (f"--{dashed}/--no-{dashed}",) if plain_type(leaf.hint) is bool else (f"--{dashed}",)


def _is_list(leaf: Leaf) -> bool:
    """A field of names (the command line reads them comma-separated)."""
    return any(get_origin(arg) is list for arg in (leaf.hint, *get_args(leaf.hint)))


def parameter(
    leaf: Leaf, note: str = "", required: bool = False, shown: str | None = None, panel: bool = False
) -> inspect.Parameter:
    """A typer option for one config field (a list field reads as comma-separated names); `note` is added to
    the field's help, and `shown` replaces the default shown, where a command reads the option differently;
    `panel`: listed under its section in --help."""
    kind = str if _is_list(leaf) else plain_type(leaf.hint)
    help_text = leaf.field.metadata["help"] + (f"; {note}" if note else "")
    section = f"Options: {'.'.join(leaf.path)}" if panel and leaf.path else None  # as a YAML file nests it
    if required:
        info = typer.Option(*_flags(leaf), help=help_text, rich_help_panel=section)
        return inspect.Parameter(leaf.field.name, inspect.Parameter.KEYWORD_ONLY, annotation=Annotated[kind, info])
    info = typer.Option(*_flags(leaf), help=help_text, show_default=_shown(leaf, shown), rich_help_panel=section)
    return inspect.Parameter(
        leaf.field.name, inspect.Parameter.KEYWORD_ONLY, default=None, annotation=Annotated[kind | None, info]
    )


def options_of(
    config: Any,
    names: Iterable[str] | None = None,
    *,
    notes: dict[str, str] | None = None,
    shown: dict[str, str] | None = None,
    required: Iterable[str] = (),
    panels: bool = False,
) -> list[inspect.Parameter]:
    """Options for the fields of `config` (every one, or `names` in their config order), nested sections
    included; `notes`, `shown` and `required` by field name (see `parameter`)."""
    wanted = None if names is None else set(names)
    notes, shown, required = notes or {}, shown or {}, set(required)
    return [
        parameter(leaf, notes.get(leaf.field.name, ""), leaf.field.name in required, shown.get(leaf.field.name), panels)
        for leaf in _selected(config, wanted)
    ]


def _selected(config: Any, wanted: set[str] | None) -> Iterator[Leaf]:
    found = [leaf for leaf in leaves(config) if wanted is None or leaf.field.name in wanted]
    missing = (wanted or set()) - {leaf.field.name for leaf in found}
    if missing:
        raise TypeError(f"no option(s) {sorted(missing)} in {type(config).__name__}")
    return iter(found)


def with_options(parameters: list[inspect.Parameter]) -> Callable[[F], F]:
    """Give a command the generated `parameters` after its own (the function takes them as **options):
    typer reads the command's options from its `__signature__`."""

    def decorate(func: F) -> F:
        own = [
            p
            for p in inspect.signature(func, eval_str=True).parameters.values()
            if p.kind is not inspect.Parameter.VAR_KEYWORD
        ]
        own = [p.replace(kind=inspect.Parameter.KEYWORD_ONLY) for p in own]
        func.__signature__ = inspect.Signature([*own, *parameters])  # type: ignore[attr-defined]
        return func

    return decorate


def given(config: Any, options: dict[str, Any]) -> dict[str, Any]:
    """The options set on the command line, comma-separated lists split, as the config's fields take them."""
    lists = {leaf.field.name for leaf in leaves(config) if _is_list(leaf)}
    return {name: split_list(value) if name in lists else value for name, value in options.items() if value is not None}
