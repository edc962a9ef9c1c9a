"""`lorakit analyze`: the LoRA paper's Section 7 analysis of a saved adapter (and its similarity to another),
as rich tables on screen and analysis.json, analysis.md and PNGs in the output folder."""

from __future__ import annotations

from pathlib import Path
from typing import Annotated

import typer
from rich import box
from rich.table import Table

from .common import USER_ERRORS, AdapterArgument, AdapterOption, ModelOfAdapter, app, console, fail, one_adapter


def _table(title: str, headers: list[str], rows: list[list[str]]) -> Table:
    table = Table(title=title, title_justify="left", box=box.SIMPLE_HEAD)
    for i, header in enumerate(headers):
        table.add_column(header, justify="left" if i == 0 else "right")
    for cells in rows:
        table.add_row(*cells)
    return table


@app.command()
def analyze(
    adapter: AdapterArgument = None,
    adapter_option: AdapterOption = None,
    compare: Annotated[
        Path | None, typer.Option(help="a second adapter of the same base and modules: subspace similarity")
    ] = None,
    model: ModelOfAdapter = None,
    output: Annotated[
        Path | None, typer.Option(help="folder for analysis.json, analysis.md and the PNGs (default: ADAPTER/analysis)")
    ] = None,
    factor: Annotated[
        str, typer.Option(help="A: compare input sides (right-singular vectors of A); B: output sides (left of B)")
    ] = "A",
    no_base: Annotated[
        bool, typer.Option("--no-base", help="skip what needs the base weights (‖W‖, projections)")
    ] = False,
    seed: Annotated[int, typer.Option(help="seed of the random directions in the ΔW vs W table")] = 0,
) -> None:
    """Spectrum and effective rank of each ΔW, ΔW vs W (‖UᵀWVᵀ‖, amplification), and with --compare the subspace
    similarity φ(i, j)."""
    from ..analysis.report import analyze_adapter, check_output, comparison_table, layer_table, write_report

    try:
        folder = one_adapter(adapter, adapter_option)
        out = check_output(output if output is not None else folder / "analysis")  # before the slow part
        report = analyze_adapter(
            folder, model=model, compare=compare, factor=factor, with_base=not no_base, seed=seed, progress=True
        )
        written = write_report(report, out)
    except USER_ERRORS as err:
        fail(err)
    console.print(_table(f"ΔW per layer: {report['label']} (r={report['config']['r']})", *layer_table(report)))
    if "comparison" in report:
        other = report["comparison"]["other_label"]
        console.print(_table(f"subspace similarity φ with {other} (factor {factor})", *comparison_table(report)))
    console.print(f"written: {', '.join(str(p) for p in written)}", soft_wrap=True)
