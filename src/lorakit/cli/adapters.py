"""`lorakit merge`, `lorakit combine` and `lorakit info`: work on saved adapter folders."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated, Any

import typer
from rich.table import Table

from ..atomic import write_folder
from .common import (
    USER_ERRORS,
    AdapterArgument,
    AdapterFolder,
    AdapterOption,
    DeviceOption,
    ModelOfAdapter,
    NamedAdapters,
    NamingFolders,
    SavedPrecision,
    Target,
    app,
    console,
    fail,
    load_with_adapters,
    named_folders,
    one_adapter,
    split_list,
)


@app.command()
def merge(
    adapter: AdapterFolder,
    output: Annotated[Path, typer.Option(help="folder for the standalone merged checkpoint")],
    model: ModelOfAdapter = None,
    device: DeviceOption = "auto",
    precision: SavedPrecision = "fp32",
) -> None:
    """Fold an adapter into its base model and save a plain transformers checkpoint (no lorakit needed to load it).
    The merge runs in float32; --precision is the dtype of the checkpoint written."""
    import lorakit

    try:
        target = Target(device, precision)
        if output.exists() and any(output.iterdir()):
            raise ValueError(f"output folder {output} is not empty")
        base, tokenizer, _ = load_with_adapters(model, [adapter], target=Target(device, "fp32"))
        merged: Any = lorakit.merge_and_unload(base)  # a transformers model: save_pretrained
        merged.to(dtype=target.dtype)
        # Whole or not at all, with the file modes open() gives (save_pretrained's safetensors files are 0600).
        write_folder(output, lambda tmp: (merged.save_pretrained(tmp), tokenizer.save_pretrained(tmp)))
    except USER_ERRORS as err:
        fail(err)
    console.print(f"merged model written to [bold]{output}[/]")


@app.command("combine")
def combine_(
    output: Annotated[Path, typer.Option(help="folder for the combined adapter")],
    adapter: NamingFolders = None,
    named_adapter: NamedAdapters = None,
    weights: Annotated[str | None, typer.Option(help="NAME=WEIGHT,... (default: 1 for each adapter)")] = None,
    # --method is the older spelling (it means the fine-tuning method in train and estimate).
    method: Annotated[
        str, typer.Option("--combination", "--method", help="cat (exact weighted sum), linear, svd or ties")
    ] = "cat",
    rank: Annotated[
        int | None, typer.Option(help="rank of the result for svd and ties (default: the largest input rank)")
    ] = None,
    density: Annotated[
        float, typer.Option(help="ties: fraction of each update's entries kept before the sign election")
    ] = 0.2,
    model: ModelOfAdapter = None,
) -> None:
    """Combine adapters into one (weighted):
    lorakit combine --named-adapter a=runs/a --named-adapter b=runs/b --weights a=0.7,b=0.3 --output mix"""
    import lorakit

    try:
        folders = named_folders(adapter or [], named_adapter or [])
        if not folders:
            raise ValueError("give the adapters to combine: --adapter FOLDER or --named-adapter NAME=FOLDER")
        names = list(folders)
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
        base, _, _ = load_with_adapters(model, list(folders.values()), names=names)
        lorakit.combine(base, mix, method=method, name="combined", rank=rank, density=density)
        lorakit.save_adapter(base, output, name="combined")
        config = lorakit.adapter_config(base, "combined")
    except (*USER_ERRORS, RuntimeError) as err:
        fail(err)
    weights_text = ", ".join(f"{n}×{w:g}" for n, w in mix.items())
    console.print(f"{method} of {weights_text} (rank {config.r}) written to [bold]{output}[/]")


@app.command()
def info(adapter: AdapterArgument = None, adapter_option: AdapterOption = None) -> None:
    """An adapter folder's config, size, targets and parameter table."""
    import lorakit

    from ..io import WEIGHTS_NAME

    try:
        folder = one_adapter(adapter, adapter_option)
        config, tensors = lorakit.read_adapter(folder)
    except USER_ERRORS as err:
        fail(err)
    weights = folder / WEIGHTS_NAME
    size = weights.stat().st_size if weights.is_file() else 0
    console.print(f"[bold]{folder}[/]  {size / 1e6:.2f} MB, {sum(t.numel() for t in tensors.values()):,} parameters")
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
