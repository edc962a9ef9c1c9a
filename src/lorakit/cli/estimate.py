"""`lorakit estimate`: memory, size and FLOPs of a training step from a model's config alone."""

from __future__ import annotations

import json
from typing import Annotated, Any

import typer
from rich.console import Console

from ..train.config import RunConfig
from .common import USER_ERRORS, app, console, fail
from .options import given, options_of, with_options

# Options a training run has too: the same fields, so the same help and defaults as `lorakit train`.
SHARED = (
    "model",
    "task",
    "method",
    "adapter_size",
    "adapter_nonlinearity",
    "adapter_norms",
    "prefix_length",
    "prompt_length",
    "target_modules",
    "quantize",
    "r",
    "alpha",
    "dropout",
    "batch_size",
    "max_length",
)
NOTES = {
    "model": "also a folder with config.json or a JSON config file (no weights are read)",
    "method": "also qlora (lora on an nf4 base)",
}


@app.command("estimate")
@with_options(options_of(RunConfig(), SHARED, notes=NOTES, required=["model"], shown={"max_length": "256"}))
def estimate_(
    compare: Annotated[bool, typer.Option("--all-methods", "--compare", help="every method side by side")] = False,
    dtype: Annotated[
        str,
        typer.Option(
            "--precision",
            "--dtype",
            help="fp32, bf16 or fp16 (also float32, bfloat16, float16), as lorakit train's --precision: the frozen "
            "base in that dtype, trainable tensors in float32 (master weights), the forward under autocast",
        ),
    ] = "fp32",
    optimizer: Annotated[str, typer.Option(help="adamw or sgd (with momentum)")] = "adamw",
    grad_checkpointing: Annotated[
        bool, typer.Option("--grad-checkpointing", help="recompute activations in the backward pass")
    ] = False,
    checkpoint_blocks: Annotated[
        int | None,
        typer.Option(help="with --grad-checkpointing: only the first N transformer blocks (default: every block)"),
    ] = None,
    device: Annotated[
        str, typer.Option(help="cpu or cuda: which attention kernels and optimizer implementation to assume")
    ] = "cpu",
    tflops: Annotated[
        float | None, typer.Option(help="sustained TFLOP/s of your hardware, to show the time per step")
    ] = None,
    as_json: Annotated[bool, typer.Option("--json", help="print JSON instead of a table")] = False,
    **shared: Any,
) -> None:
    """Memory, adapter size and FLOPs of a training step, from the model's config alone (no weights loaded)."""
    from ..estimation import compare as compare_methods
    from ..estimation import estimate as estimate_one
    from ..estimation import report

    try:
        cfg = RunConfig(**given(RunConfig(), shared))
    except USER_ERRORS as err:
        fail(err)
    options = {name: getattr(cfg, name) for name in SHARED if name not in ("model", "method")}
    if options["max_length"] is None:  # a run's "auto" length comes from its data; an estimate has none: 256
        del options["max_length"]
    grad_checkpointing = grad_checkpointing or checkpoint_blocks is not None  # a number of blocks implies it
    options.update(dtype=dtype, optimizer=optimizer, device=device)
    options.update(grad_checkpointing=grad_checkpointing, checkpoint_blocks=checkpoint_blocks)
    try:
        results: list[Any] = (
            compare_methods(cfg.model, **options) if compare else [estimate_one(cfg.model, cfg.method, **options)]
        )
        if not any(not isinstance(e, str) for e in results):
            raise ValueError("no method applies: " + "; ".join(results))
    except USER_ERRORS as err:
        fail(err)
    if as_json:
        items = [e.to_dict() if not isinstance(e, str) else {"method": e.split(":", 1)[0], "error": e} for e in results]
        print(json.dumps(items if compare else items[0], indent=2))
        return
    grid = report.table(results, tflops)
    # Wider than the terminal rather than squeezed into unreadable cells (a pipe gets 80 columns).
    Console(width=max(console.width, report.natural_width(console, grid))).print(grid)
    for line in report.footnotes(results):
        console.print(line, highlight=False)
