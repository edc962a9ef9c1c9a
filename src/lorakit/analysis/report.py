"""One adapter's analysis end to end: read the folder(s), compute every layer's spectrum, effective ranks,
‖ΔW‖/‖W‖ and Table 7's projections, the subspace similarity to a second adapter, and write it all as
analysis.json, analysis.md and PNG figures. The tables are built once (`layer_table`, `comparison_table`)
and rendered both as markdown here and as rich tables by `lorakit analyze`.
"""

from __future__ import annotations

import json
import os
from pathlib import Path
from typing import Any

import torch
from torch import nn
from tqdm.auto import tqdm

from ..atomic import atomic_write
from .adapters import (
    AdaptedLayer,
    AdapterFactors,
    base_weight,
    check_comparable,
    folder_label,
    load_base,
    read_factors,
    split_path,
)
from .plots import plot_similarity, plot_spectra
from .spectrum import effective_rank, energy_rank
from .subspace import FACTORS, random_baseline, subspace_similarity
from .weights import delta_vs_weight

ENERGY = 0.9
JSON_NAME, MARKDOWN_NAME, SPECTRUM_NAME = "analysis.json", "analysis.md", "spectrum.png"


def analyze_adapter(
    adapter: str | os.PathLike,
    model: str | os.PathLike | nn.Module | None = None,
    compare: str | os.PathLike | None = None,
    factor: str = "A",
    with_base: bool = True,
    seed: int = 0,
    progress: bool = False,
) -> dict[str, Any]:
    """The analysis of a saved adapter as a JSON-ready dict.

    model: the base (a module, a name or path); default the one the adapter names. with_base=False skips what
    needs W (‖W‖, ‖ΔW‖/‖W‖, projections). compare: a second adapter folder of the same base and modules, for
    the subspace similarity of their `factor` ("A": input side, "B": output side). seed: the random directions.
    """
    if factor not in FACTORS:
        raise ValueError(f"factor must be one of {FACTORS}, got {factor!r}")
    first = read_factors(adapter)
    second = read_factors(compare) if compare is not None else None
    if second is not None:
        check_comparable(first, second)
    base = load_base(first.config, model) if with_base else None
    weights = {path: base_weight(base, layer) for path, layer in first.layers.items()} if base is not None else {}
    generator = torch.Generator().manual_seed(seed)

    rows = [
        _layer_row(path, layer, weights.get(path), generator)
        for path, layer in tqdm(first.layers.items(), desc="layers", disable=not progress)
    ]
    report: dict[str, Any] = {
        "adapter": str(adapter),
        "label": folder_label(adapter),
        "base_model": _base_name(first.config.base_model_name_or_path, model) if base is not None else None,
        "config": {
            "r": first.config.r,
            "alpha": first.config.alpha,
            "use_rslora": first.config.use_rslora,
            "target_modules": first.config.target_modules,
        },
        "energy_fraction": ENERGY,
        "seed": seed,
        "layers": rows,
        "skipped": first.skipped,
    }
    if second is not None:
        report["comparison"] = _compare(first, second, factor)
    return report


def _layer_row(
    path: str, layer: AdaptedLayer, weight: torch.Tensor | None, generator: torch.Generator
) -> dict[str, Any]:
    """One layer's spectrum and effective ranks, and with its base `weight` Table 7's quantities."""
    svd = layer.svd()
    kind, index = split_path(path)
    row: dict[str, Any] = {
        "module": path,
        "kind": kind,
        "layer": index,
        "rank": layer.rank,
        "scaling": layer.scaling,
        "delta_norm": float(svd.s.norm()),
        "singular_values": svd.s.tolist(),
        "effective_rank": effective_rank(svd.s),
        "energy_rank": energy_rank(svd.s, ENERGY),
    }
    if weight is not None:
        table7 = delta_vs_weight(svd, weight, generator=generator).to_dict()
        del table7["rank"], table7["delta_norm"]  # already in the row
        weight_norm = table7["weight_norm"]
        row.update(table7, relative_norm=row["delta_norm"] / weight_norm if weight_norm > 0 else None)
    return row


def _base_name(named: str | None, model: str | os.PathLike | nn.Module | None) -> str:
    if isinstance(model, nn.Module):
        return named or type(model).__name__
    return str(model) if model is not None else str(named)


def _compare(first: AdapterFactors, second: AdapterFactors, factor: str) -> dict[str, Any]:
    layers = []
    for path, layer in first.layers.items():
        other = second.layers[path]
        grid = (
            subspace_similarity(layer.a, other.a, "A") if factor == "A" else subspace_similarity(layer.b, other.b, "B")
        )
        r1, r2 = grid.shape
        k = min(r1, r2)
        dim = layer.shape[1] if factor == "A" else layer.shape[0]
        kind, index = split_path(path)
        layers.append(
            {
                "module": path,
                "kind": kind,
                "layer": index,
                "r1": r1,
                "r2": r2,
                "dim": dim,
                "phi_1_1": float(grid[0, 0]),
                "phi_k_k": float(grid[k - 1, k - 1]),
                "phi_r1_r2": float(grid[-1, -1]),
                "random_r1_r2": random_baseline(r1, r2, dim),
                "phi": [[round(float(v), 6) for v in line] for line in grid],
            }
        )
    return {"other": second.folder, "other_label": folder_label(second.folder), "factor": factor, "layers": layers}


# -- tables ---------------------------------------------------------------------------------------
def _num(value: float | None, digits: int = 3) -> str:
    return "–" if value is None else f"{value:.{digits}g}" if abs(value) < 1e-3 and value else f"{value:.{digits}f}"


def layer_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    """Per layer: rank, ‖ΔW‖_F, effective ranks, and with a base ‖W‖_F, ‖ΔW‖/‖W‖ and Table 7's projections."""
    with_base = report["base_model"] is not None
    headers = ["layer", "r", "‖ΔW‖", "erank", f"r{ENERGY:.0%}"]
    if with_base:
        headers += ["‖W‖", "‖ΔW‖/‖W‖", "‖UᵀWVᵀ‖ ΔW", "W", "random", "amplif."]
    rows = []
    for row in report["layers"]:
        cells = [
            _short(row),
            str(row["rank"]),
            _num(row["delta_norm"], 4),
            f"{row['effective_rank']:.2f}",
            str(row["energy_rank"]),
        ]
        if with_base:
            cells += [
                _num(row["weight_norm"], 4),
                _num(row["relative_norm"], 4),
                _num(row["projection_delta"], 4),
                _num(row["projection_weight"], 4),
                _num(row["projection_random"], 4),
                _num(row["amplification"], 3),
            ]
        rows.append(cells)
    return headers, rows


def comparison_table(report: dict[str, Any]) -> tuple[list[str], list[list[str]]]:
    comparison = report["comparison"]
    headers = ["layer", "r₁", "r₂", "φ(1,1)", "φ(k,k), k=min r", "φ(r₁,r₂)", "random φ(r₁,r₂)"]
    rows = [
        [
            _short(row),
            str(row["r1"]),
            str(row["r2"]),
            f"{row['phi_1_1']:.3f}",
            f"{row['phi_k_k']:.3f}",
            f"{row['phi_r1_r2']:.3f}",
            f"{row['random_r1_r2']:.3f}",
        ]
        for row in comparison["layers"]
    ]
    return headers, rows


def _short(row: dict[str, Any]) -> str:
    """The label `3 self_attn.q_proj` for model.layers.3.self_attn.q_proj (the full path is in the JSON)."""
    return f"{row['layer']} {row['kind']}" if row["layer"] is not None else row["module"]


def _markdown_table(headers: list[str], rows: list[list[str]]) -> list[str]:
    lines = ["| " + " | ".join(headers) + " |", "|" + "|".join(["---"] + ["---:"] * (len(headers) - 1)) + "|"]
    return lines + ["| " + " | ".join(cells) + " |" for cells in rows]


def markdown(report: dict[str, Any]) -> str:
    config = report["config"]
    scale = "α/√r" if config["use_rslora"] else "α/r"
    lines = [
        f"## Analysis of adapter `{report['label']}`",
        "",
        f"r = {config['r']}, α = {config['alpha']:g} (ΔW = {scale} · B·A), "
        f"base: {report['base_model'] or 'not loaded'}. "
        f"Norms are Frobenius norms. erank: the entropy effective rank exp(H(σ/Σσ)) (Roy & Vetterli); "
        f"r{ENERGY:.0%}: the fewest singular values holding {ENERGY:.0%} of ‖ΔW‖².",
    ]
    if report["base_model"] is not None:
        lines.append(
            "‖UᵀWVᵀ‖ with U, V the top-r singular directions of ΔW, of W, or random (the LoRA paper's "
            "Table 7); amplification = ‖ΔW‖ / ‖UᵀWVᵀ‖ for ΔW's directions."
        )
    lines += [""] + _markdown_table(*layer_table(report))
    if report["skipped"]:
        lines += ["", f"Not analysed (not linear layers): {', '.join(report['skipped'])}."]
    if "comparison" in report:
        comparison = report["comparison"]
        side = (
            "right-singular vectors of A (input side)"
            if comparison["factor"] == "A"
            else "left-singular vectors of B (output side)"
        )
        lines += [
            "",
            f"### Subspace similarity with `{comparison['other_label']}`",
            "",
            f"φ(i, j) = ‖U₁ᵢᵀU₂ⱼ‖²_F / min(i, j) over the {side}; 1: one span inside the other, 0: orthogonal. "
            "A random pair of spans gives max(i, j) / n on average (last column). Heat maps: subspace_*.png.",
            "",
        ] + _markdown_table(*comparison_table(report))
    return "\n".join(lines) + "\n"


# -- files ----------------------------------------------------------------------------------------
def check_output(output: str | os.PathLike) -> Path:
    """The output folder, refused (ValueError) when a file is in its place."""
    out = Path(output)
    if out.exists() and not out.is_dir():
        raise ValueError(f"output {out} exists and is not a folder")
    return out


def write_report(report: dict[str, Any], output: str | os.PathLike) -> list[Path]:
    """Write analysis.json, analysis.md, spectrum.png and (with a comparison) one subspace_<kind>.png per module
    kind into the folder `output`; returns the paths written."""
    out = check_output(output)
    out.mkdir(parents=True, exist_ok=True)
    text = json.dumps(report, indent=1)
    written = [out / JSON_NAME, out / MARKDOWN_NAME]
    atomic_write(written[0], lambda tmp: Path(tmp).write_text(text))
    atomic_write(written[1], lambda tmp: Path(tmp).write_text(markdown(report)))
    groups: dict[str, list] = {}
    for row in report["layers"]:
        groups.setdefault(row["kind"], []).append((_layer_label(row), row["singular_values"]))
    written.append(plot_spectra(groups, out / SPECTRUM_NAME, f"singular values of ΔW: {report['label']}"))
    if "comparison" in report:
        comparison = report["comparison"]
        by_kind: dict[str, list] = {}
        for row in comparison["layers"]:
            by_kind.setdefault(row["kind"], []).append((_layer_label(row), row["phi"]))
        for kind, panels in by_kind.items():
            title = (
                f"φ({comparison['factor']} of {report['label']}, {comparison['factor']} of "
                f"{comparison['other_label']}, i, j): {kind}"
            )
            written.append(
                plot_similarity(
                    panels,
                    out / f"subspace_{_file_part(kind)}.png",
                    title,
                    y_label=f"i ({report['label']})",
                    x_label=f"j ({comparison['other_label']})",
                )
            )
    return written


def _layer_label(row: dict[str, Any]) -> str:
    return f"layer {row['layer']}" if row["layer"] is not None else row["module"]


def _file_part(kind: str) -> str:
    return "".join(c if c.isalnum() or c in "-_" else "_" for c in kind)


__all__ = ["analyze_adapter", "check_output", "comparison_table", "layer_table", "markdown", "write_report"]
