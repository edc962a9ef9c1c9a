"""`lorakit merge`, `lorakit combine` and `lorakit info`: work on saved adapter folders."""

from __future__ import annotations

import os
import shutil
import tempfile
from pathlib import Path
from typing import Annotated, Optional

import typer
from rich.table import Table

from .common import USER_ERRORS, app, console, fail, load_with_adapters, split_list


@app.command()
def merge(
    adapter: Annotated[Path, typer.Option(help="adapter folder")],
    output: Annotated[Path, typer.Option(help="folder for the standalone merged checkpoint")],
    model: Annotated[Optional[str], typer.Option(help="base model (default: the one the adapter names)")] = None,
) -> None:
    """Fold an adapter into its base model and save a plain transformers checkpoint (no lorakit needed to load it)."""
    import lorakit

    try:
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"output folder {output} is not empty")
        base, tokenizer, _ = load_with_adapters(model, [adapter])
        merged = lorakit.merge_and_unload(base)
        output.parent.mkdir(parents=True, exist_ok=True)
        tmp = Path(tempfile.mkdtemp(prefix=f".{output.name}-", dir=output.parent))
        try:
            merged.save_pretrained(tmp)
            tokenizer.save_pretrained(tmp)
            if output.exists():
                output.rmdir()
            os.replace(tmp, output)
        finally:
            shutil.rmtree(tmp, ignore_errors=True)
    except USER_ERRORS as err:
        fail(err)
    console.print(f"merged model written to [bold]{output}[/]")


@app.command("combine")
def combine_(
    adapter: Annotated[list[str], typer.Option(help="NAME=FOLDER of an adapter to combine (repeat the option)")],
    output: Annotated[Path, typer.Option(help="folder for the combined adapter")],
    weights: Annotated[Optional[str], typer.Option(help="NAME=WEIGHT,... (default: 1 for each adapter)")] = None,
    method: Annotated[str, typer.Option(help="cat (exact weighted sum), linear, svd or ties")] = "cat",
    rank: Annotated[Optional[int], typer.Option(help="rank of the result for svd and ties (default: the largest input rank)")] = None,
    density: Annotated[float, typer.Option(help="ties: fraction of each update's entries kept before the sign election")] = 0.2,
    model: Annotated[Optional[str], typer.Option(help="base model (default: the one the first adapter names)")] = None,
) -> None:
    """Combine adapters into one (weighted): lorakit combine --adapter a=runs/a --adapter b=runs/b --weights a=0.7,b=0.3 --output mix"""
    import lorakit

    try:
        pairs = [item.split("=", 1) for item in adapter]
        if any(len(p) != 2 or not p[0] or not p[1] for p in pairs):
            raise ValueError(f"--adapter takes NAME=FOLDER, got {adapter}")
        names = [name for name, _ in pairs]
        if len(set(names)) != len(names):
            raise ValueError(f"adapter names must differ, got {names}")
        mix = {name: 1.0 for name in names}
        for item in split_list(weights) or []:
            name, _, value = item.partition("=")
            if name not in mix:
                raise ValueError(f"--weights names {name!r}, which is not one of the adapters {names}")
            try:
                mix[name] = float(value)
            except ValueError:
                raise ValueError(f"--weights: {item!r} is not NAME=NUMBER") from None
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"output folder {output} is not empty")
        base, _, _ = load_with_adapters(model, [Path(folder) for _, folder in pairs], names=names)
        lorakit.combine(base, mix, method=method, name="combined", rank=rank, density=density)
        lorakit.save_adapter(base, output, name="combined")
        config = lorakit.adapter_config(base, "combined")
    except (*USER_ERRORS, RuntimeError) as err:
        fail(err)
    weights_text = ", ".join(f"{n}×{w:g}" for n, w in mix.items())
    console.print(f"{method} of {weights_text} (rank {config.r}) written to [bold]{output}[/]")


@app.command()
def info(adapter: Annotated[Path, typer.Argument(help="adapter folder")]) -> None:
    """An adapter folder's config, size, targets and parameter table."""
    import lorakit
    from ..io import WEIGHTS_NAME

    try:
        config, tensors = lorakit.read_adapter(adapter)
    except USER_ERRORS as err:
        fail(err)
    weights = adapter / WEIGHTS_NAME
    size = weights.stat().st_size if weights.is_file() else 0
    console.print(f"[bold]{adapter}[/]  {size / 1e6:.2f} MB, {sum(t.numel() for t in tensors.values()):,} parameters")
    console.print(
        f"base model: {config.base_model_name_or_path or '?'}   task: {config.task_type or '?'}   "
        f"r={config.r} alpha={config.alpha} dropout={config.dropout} bias={config.bias}"
    )
    table = Table()
    for column in ("module", "count", "shapes", "parameters"):
        table.add_column(column, justify="right" if column in ("count", "parameters") else "left")
    groups: dict[str, list] = {}
    for key, tensor in tensors.items():
        parts = key.split(".")
        kind = next((p for p in parts if p.startswith("lora_")), None)
        module = parts[parts.index(kind) - 1] if kind else parts[-2] if len(parts) > 1 else key
        groups.setdefault(f"{module}.{kind}" if kind else module, []).append(tensor)
    for name, group in sorted(groups.items()):
        shapes = sorted({"×".join(map(str, t.shape)) for t in group})
        table.add_row(name, str(len(group)), ", ".join(shapes), f"{sum(t.numel() for t in group):,}")
    console.print(table)
