"""What every command shares: the Typer app, consoles, the one-line error exit, and the options that mean
the same in every command: `--model` (one help text), `--adapter` (always a folder; where a command
names its adapters, `--named-adapter NAME=FOLDER`), and `--device` / `--precision` (`lorakit.device`).

The errors the library raises for bad input (ValueError, KeyError, FileNotFoundError) are shown as one
line and exit 2, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import torch
import typer
from rich.console import Console

from ..device import DEVICE_HELP, PRECISION_HELP, resolve_device, resolve_precision
from ..train.examples import CLASSIFICATION, REGRESSION
from ..train.sections import MODEL_HELP

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Low-Rank Adaptation of transformer models.")
console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (ValueError, KeyError, FileNotFoundError)

ADAPTER_HELP = "adapter folder (as lorakit train writes it)"
ADAPTERS_HELP = "adapter folder; repeat for several (all active: their updates add)"
NAMED_HELP = "NAME=FOLDER: an adapter folder under a name of your choice (repeat)"
# `--model` of the commands that work on saved adapters: the base the adapter names, unless given.
ModelOfAdapter = Annotated[str | None, typer.Option(help=MODEL_HELP, show_default="the one the adapter names")]
RequiredModel = Annotated[str, typer.Option(help=MODEL_HELP)]
AdapterFolder = Annotated[Path, typer.Option("--adapter", help=ADAPTER_HELP)]
AdapterFolders = Annotated[list[Path] | None, typer.Option("--adapter", help=ADAPTERS_HELP)]
# Commands that name their adapters also read the older `--adapter NAME=FOLDER` spelling.
NamingFolders = Annotated[
    list[str] | None,
    typer.Option(
        "--adapter", help="adapter folder, named after the folder (repeat); NAME=FOLDER is read as --named-adapter"
    ),
]
NamedAdapters = Annotated[list[str] | None, typer.Option("--named-adapter", help=NAMED_HELP)]
AdapterArgument = Annotated[Path | None, typer.Argument(help=f"{ADAPTER_HELP} (or --adapter)", show_default=False)]
AdapterOption = Annotated[Path | None, typer.Option("--adapter", help=ADAPTER_HELP)]
DeviceOption = Annotated[str, typer.Option(help=DEVICE_HELP)]
PrecisionOption = Annotated[str, typer.Option(help=PRECISION_HELP)]
SavedPrecision = Annotated[
    str, typer.Option("--precision", help="dtype of the checkpoint written: fp32, bf16 or fp16 (merged in float32)")
]


class Target:
    """Where a command's model runs and its compute dtype, from `--device` and `--precision` (a device that is
    not there: ValueError, one line)."""

    def __init__(self, device: str = "auto", precision: str = "auto") -> None:
        self.device = resolve_device(device)
        self.dtype = resolve_precision(precision, self.device)


def fail(err: BaseException) -> None:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def split_list(value: str | None) -> list[str] | None:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def one_adapter(argument: Path | None, option: Path | None) -> Path:
    """The adapter folder of a command that takes it as its argument or as --adapter."""
    if argument is not None and option is not None and argument != option:
        raise ValueError(f"two adapter folders given ({argument} and --adapter {option}); give one")
    folder = argument if argument is not None else option
    if folder is None:
        raise ValueError("give the adapter folder (as the argument or with --adapter)")
    return folder


def named_folders(folders: list[str], named: list[str]) -> dict[str, Path]:
    """`--adapter FOLDER` (named after its folder) and `--named-adapter NAME=FOLDER` as name → folder, in the
    order given. An `--adapter` value that is not a folder but holds "=" is the older NAME=FOLDER spelling."""
    specs = [(spec, "--adapter") for spec in folders] + [(spec, "--named-adapter") for spec in named]
    adapters: dict[str, Path] = {}
    for spec, flag in specs:
        if flag == "--adapter" and ("=" not in spec or Path(spec).is_dir()):
            name, folder = Path(spec).resolve().name.replace(".", "_"), spec
        else:
            name, _, folder = spec.partition("=")
            if not name or not folder:
                raise ValueError(f"{flag} takes NAME=FOLDER, got {spec!r}")
        if name in adapters:
            raise ValueError(f"two adapters are named {name!r}")
        adapters[name] = Path(folder)
    return adapters


HEAD_TASKS = (CLASSIFICATION, REGRESSION)  # the tasks of a model with a sequence-classification head


def head_task(task: str | None) -> str:
    """The task of a model with a classification head: regression when the run says so, else seq-cls."""
    return REGRESSION if task == REGRESSION else CLASSIFICATION


def load_with_adapters(
    model: str | None,
    adapters: list[Path],
    task: str | None = None,
    names: list[str] | None = None,
    target: Target | None = None,
):
    """Base model (given, or named in the first adapter) with every adapter loaded and active (named by
    `names`, else by their folder names). A folder of another method (lorakit.methods) is loaded alone.
    With `target`, the base is loaded in its dtype and everything is put on its device."""
    base, tokenizer, task = _load_with_adapters(model, adapters, task, names, target.dtype if target else None)
    if target is not None:
        base.to(target.device)
    return base, tokenizer, task


def _load_with_adapters(
    model: str | None, adapters: list[Path], task: str | None, names: list[str] | None, dtype: torch.dtype | None
):
    import lorakit

    from ..methods import is_method_folder
    from ..models import load_model

    dtype = dtype or torch.float32
    if any(is_method_folder(a) for a in adapters):
        return _load_with_method(model, adapters, task, dtype)
    configs = [lorakit.read_adapter(a) for a in adapters]
    if model is None:
        if not configs or not configs[0][0].base_model_name_or_path:
            raise ValueError("--model is required (the adapter does not name its base model)")
        model = configs[0][0].base_model_name_or_path
    seq_cls = task in HEAD_TASKS or (task is None and configs and configs[0][0].task_type == "SEQ_CLS")
    num_labels = None
    if seq_cls and task != REGRESSION:  # a regression head has one output, always
        heads = [
            t for _, tensors in configs for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight"))
        ]
        num_labels = heads[0].shape[0] if heads else None
    task = head_task(task) if seq_cls else "causal-lm"
    base, tokenizer = load_model(model, task, num_labels=num_labels, dtype=dtype)
    names = list(names) if names else [folder.resolve().name.replace(".", "_") or "default" for folder in adapters]
    for folder, name in zip(adapters, names):
        lorakit.load_adapter(base, folder, name=name)
    if names:
        lorakit.set_adapter(base, names)
    return base, tokenizer, task


def _load_with_method(model: str | None, adapters: list[Path], task: str | None, dtype: torch.dtype):
    from ..methods import load_method, read_method
    from ..models import load_model

    if len(adapters) != 1:
        raise ValueError(
            "a folder of a method other than LoRA (full, bitfit, adapter, prefix, prompt, head) is loaded alone"
        )
    config, tensors = read_method(adapters[0])
    model = model or config.get("base_model_name_or_path")
    if not model:
        raise ValueError("--model is required (the method folder does not name its base model)")
    seq_cls = task in HEAD_TASKS or (task is None and config.get("task_type") == "SEQ_CLS")
    heads = [t for k, t in tensors.items() if k in ("classifier.weight", "score.weight")]
    task = head_task(task) if seq_cls else "causal-lm"
    num_labels = heads[0].shape[0] if task == CLASSIFICATION and heads else None
    base, tokenizer = load_model(model, task, num_labels=num_labels, dtype=dtype)
    load_method(base, adapters[0])
    return base, tokenizer, task
