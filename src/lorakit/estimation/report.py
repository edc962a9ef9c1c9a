"""Text rendering of estimates for the command line: one column per method, one row per quantity."""

from __future__ import annotations

from rich.console import Console
from rich.measure import Measurement
from rich.table import Table

from .result import Estimate


def human_bytes(n: int | None) -> str:
    """Decimal units, as model sizes are quoted (175B parameters × 2 bytes = 350 GB)."""
    if n is None:
        return "?"
    for unit, scale in (("TB", 1e12), ("GB", 1e9), ("MB", 1e6), ("kB", 1e3)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}" if n / scale < 100 else f"{n / scale:,.0f} {unit}"
    return f"{n} B"


def human_flops(n: int | None) -> str:
    if n is None:
        return "?"
    for unit, scale in (("PFLOP", 1e15), ("TFLOP", 1e12), ("GFLOP", 1e9), ("MFLOP", 1e6)):
        if n >= scale:
            return f"{n / scale:.3g} {unit}"
    return f"{n} FLOP"


def human_seconds(s: float | None) -> str:
    if s is None:
        return "?"
    if s < 1:
        return f"{s * 1e3:.3g} ms"
    if s < 120:
        return f"{s:.3g} s"
    return f"{s / 60:.3g} min" if s < 7200 else f"{s / 3600:.3g} h"


def _optimizer_label(e: Estimate) -> str:
    return "optimizer state (AdamW: 2 moments)" if e.optimizer == "adamw" else "optimizer state (SGD momentum)"


def rows(e: Estimate, tflops: float | None = None) -> list[tuple[str, str]]:
    pct = f" ({100 * e.trainable_fraction:.3g} %)" if e.method != "full" else ""
    out = [
        ("trainable parameters", f"{e.trainable_parameters:,}{pct}"),
        ("frozen weights", human_bytes(e.frozen_weight_bytes)),
        ("trainable weights", human_bytes(e.trainable_weight_bytes)),
        ("gradients", human_bytes(e.gradient_bytes)),
        (_optimizer_label(e), human_bytes(e.optimizer_bytes)),
        (f"activations (B={e.batch_size} × T={e.max_length})", human_bytes(e.activation_bytes)),
    ]
    if e.device == "cpu":
        out.append(("malloc slack + runtime (CPU)", human_bytes(e.allocator_bytes)))
    out += [
        ("peak training memory", human_bytes(e.total_bytes)),
        ("adapter file (full: the model)", human_bytes(e.adapter_file_bytes)),
        ("FLOPs per step", human_flops(e.flops_per_step)),
    ]
    if tflops:
        out.append((f"time per step at {tflops:g} TFLOP/s", human_seconds(e.seconds_per_step(tflops))))
    return out


def _checkpointing_text(e: Estimate) -> str:
    if not e.grad_checkpointing:
        return ""
    blocks = e.checkpoint_blocks
    return ", gradient checkpointing" + ("" if blocks is None else f" (first {blocks} block{'s' * (blocks != 1)})")


def table(estimates: list[Estimate | str], tflops: float | None = None) -> Table:
    """Rows of quantities, a column per method; a method that does not apply shows n/a."""
    done = [e for e in estimates if isinstance(e, Estimate)]
    first = done[0]
    quant = f", {first.quantize}" if len(done) == 1 and first.quantize else ""
    title = (
        f"{first.model} ({first.architecture}, {first.total_parameters:,} parameters) — {first.dtype}{quant}, "
        f"{first.optimizer}, batch {first.batch_size} × {first.max_length} tokens"
        f"{_checkpointing_text(first)}, {first.device}"
    )
    grid = Table(title=title, title_justify="left")
    grid.add_column("", no_wrap=True)
    labels = [label for label, _ in rows(first, tflops)]
    columns: list[list[str]] = []
    for item in estimates:
        if isinstance(item, Estimate):
            name = item.method + (f" ({item.quantize})" if item.quantize and item.method != "qlora" else "")
            grid.add_column(name, justify="right", no_wrap=True)
            columns.append([value for _, value in rows(item, tflops)])
        else:
            grid.add_column(item.split(":", 1)[0], justify="right", no_wrap=True)
            columns.append(["n/a"] * len(labels))
    for index, label in enumerate(labels):
        style = "bold" if label == "peak training memory" else None
        grid.add_row(label, *[column[index] for column in columns], style=style)
    return grid


def natural_width(console: Console, renderable) -> int:
    """Columns the renderable takes unwrapped."""
    return Measurement.get(console, console.options.update_width(10_000), renderable).maximum


def footnotes(estimates: list[Estimate | str]) -> list[str]:
    lines: list[str] = []
    done = [e for e in estimates if isinstance(e, Estimate)]
    lora = next((e for e in done if e.target_modules), None)
    if lora is not None:
        lines.append(f"LoRA targets: {lora.target_modules}")
    for item in estimates:
        if isinstance(item, str):
            lines.append(item)
    seen: set[str] = set()
    for e in done:
        for note in e.notes:
            if note not in seen:
                seen.add(note)
                shared = all(note in other.notes for other in done)
                lines.append(note if shared or len(done) == 1 else f"{e.method}: {note}")
    return lines
