"""What every command shares: the Typer app, consoles, and the one-line error exit.

The errors the library raises for bad input (ValueError, KeyError, FileNotFoundError) are shown as one
line and exit 2, never as a traceback.
"""

from __future__ import annotations

from pathlib import Path
from typing import Optional

import typer
from rich.console import Console

app = typer.Typer(add_completion=False, no_args_is_help=True, help="Low-Rank Adaptation of transformer models.")
console = Console()
err_console = Console(stderr=True)

USER_ERRORS = (ValueError, KeyError, FileNotFoundError)


def fail(err: BaseException) -> None:
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    err_console.print(f"[bold red]error:[/] {message}", highlight=False, soft_wrap=True)
    raise typer.Exit(2)


def split_list(value: Optional[str]) -> Optional[list[str]]:
    return [v.strip() for v in value.split(",") if v.strip()] if value else None


def load_with_adapters(model: Optional[str], adapters: list[Path], task: Optional[str] = None,
                        names: Optional[list[str]] = None):
    """Base model (given, or named in the first adapter) with every adapter loaded and active (named by
    `names`, else by their folder names). A folder of another method (lorakit.methods) is loaded alone."""
    import lorakit
    from ..models import load_model
    from ..methods import is_method_folder

    if any(is_method_folder(a) for a in adapters):
        return _load_with_method(model, adapters, task)
    configs = [lorakit.read_adapter(a) for a in adapters]
    if model is None:
        if not configs or not configs[0][0].base_model_name_or_path:
            raise ValueError("--model is required (the adapter does not name its base model)")
        model = configs[0][0].base_model_name_or_path
    seq_cls = task == "seq-cls" or (task is None and configs and configs[0][0].task_type == "SEQ_CLS")
    num_labels = None
    if seq_cls:
        heads = [t for _, tensors in configs for k, t in tensors.items() if k.endswith(("classifier.weight", "score.weight"))]
        num_labels = heads[0].shape[0] if heads else None
    task = "seq-cls" if seq_cls else "causal-lm"
    base, tokenizer = load_model(model, task, num_labels=num_labels)
    names = list(names) if names else [folder.resolve().name.replace(".", "_") or "default" for folder in adapters]
    for folder, name in zip(adapters, names):
        lorakit.load_adapter(base, folder, name=name)
    if names:
        lorakit.set_adapter(base, names)
    return base, tokenizer, task


def _load_with_method(model: Optional[str], adapters: list[Path], task: Optional[str]):
    from ..methods import load_method, read_method
    from ..models import load_model

    if len(adapters) != 1:
        raise ValueError("a folder of a method other than LoRA (full, bitfit, adapter, prefix, prompt, head) is loaded alone")
    config, tensors = read_method(adapters[0])
    model = model or config.get("base_model_name_or_path")
    if not model:
        raise ValueError("--model is required (the method folder does not name its base model)")
    seq_cls = task == "seq-cls" or (task is None and config.get("task_type") == "SEQ_CLS")
    heads = [t for k, t in tensors.items() if k in ("classifier.weight", "score.weight")]
    task = "seq-cls" if seq_cls else "causal-lm"
    base, tokenizer = load_model(model, task, num_labels=heads[0].shape[0] if seq_cls and heads else None)
    load_method(base, adapters[0])
    return base, tokenizer, task
