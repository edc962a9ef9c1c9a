"""`lorakit estimate`: memory, size and FLOPs of a training step from a model's config alone."""

from __future__ import annotations

import json
from typing import Annotated, Optional

import typer
from rich.console import Console

from .common import USER_ERRORS, app, console, fail, split_list


@app.command("estimate")
def estimate_(
    model: Annotated[str, typer.Option(help="built-in name, folder with config.json, JSON config file, .gguf, or hub id")],
    method: Annotated[str, typer.Option(help="full, lora, qlora, adapter, prefix, prompt or bitfit")] = "lora",
    compare: Annotated[bool, typer.Option("--compare", help="every method side by side")] = False,
    r: Annotated[int, typer.Option("--r", help="LoRA rank")] = 8,
    alpha: Annotated[float, typer.Option(help="LoRA alpha")] = 16.0,
    dropout: Annotated[float, typer.Option(help="LoRA dropout")] = 0.05,
    target_modules: Annotated[Optional[str], typer.Option(help="comma-separated module names, or all-linear (default: the built-in's, else all-linear)")] = None,
    quantize: Annotated[Optional[str], typer.Option(help="frozen base in nf4 or int8 (qlora implies nf4)")] = None,
    dtype: Annotated[str, typer.Option(help="float32, bfloat16 or float16")] = "float32",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (with momentum)")] = "adamw",
    batch_size: Annotated[int, typer.Option(help="examples per micro-batch")] = 8,
    max_length: Annotated[int, typer.Option(help="tokens per example")] = 256,
    grad_checkpointing: Annotated[bool, typer.Option("--grad-checkpointing", help="recompute activations in the backward pass")] = False,
    device: Annotated[str, typer.Option(help="cpu or cuda: which attention kernels and optimizer implementation to assume")] = "cpu",
    task: Annotated[Optional[str], typer.Option(help="causal-lm or seq-cls (default: from the model)")] = None,
    adapter_size: Annotated[int, typer.Option(help="bottleneck size k of adapters")] = 64,
    prefix_length: Annotated[int, typer.Option(help="prefix-tuning positions per layer")] = 30,
    prompt_length: Annotated[int, typer.Option(help="prompt-tuning virtual tokens")] = 20,
    tflops: Annotated[Optional[float], typer.Option(help="sustained TFLOP/s of your hardware, to show the time per step")] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
) -> None:
    """Memory, adapter size and FLOPs of a training step, from the model's config alone (no weights loaded)."""
    from ..estimation import compare as compare_methods
    from ..estimation import estimate as estimate_one
    from ..estimation import report

    options = dict(task=task, r=r, alpha=alpha, dropout=dropout, target_modules=split_list(target_modules) or None,
                   quantize=quantize, dtype=dtype, optimizer=optimizer, batch_size=batch_size, max_length=max_length,
                   grad_checkpointing=grad_checkpointing, device=device, adapter_size=adapter_size,
                   prefix_length=prefix_length, prompt_length=prompt_length)
    if options["target_modules"] == ["all-linear"]:
        options["target_modules"] = "all-linear"
    try:
        results = compare_methods(model, **options) if compare else [estimate_one(model, method, **options)]
        if not any(not isinstance(e, str) for e in results):
            raise ValueError("no method applies: " + "; ".join(results))
    except USER_ERRORS as err:
        fail(err)
    if as_json:
        items = [e.to_dict() if not isinstance(e, str) else {"method": e.split(":", 1)[0], "error": e}
                 for e in results]
        print(json.dumps(items if compare else items[0], indent=2))
        return
    grid = report.table(results, tflops)
    # Wider than the terminal rather than squeezed into unreadable cells (a pipe gets 80 columns).
    Console(width=max(console.width, report.natural_width(console, grid))).print(grid)
    for line in report.footnotes(results):
        console.print(line, highlight=False)
