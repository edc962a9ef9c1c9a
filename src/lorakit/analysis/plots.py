"""The analysis figures (matplotlib, Agg backend, written atomically as PNG):

- subspace-similarity heat maps, one panel per layer, φ(i, j) with i down and j across (the LoRA paper's
  Figures 3 and 4), colour scale fixed to [0, 1];
- singular-value spectra of ΔW, one panel per module kind, one line per layer.
"""

from __future__ import annotations

import math
from collections.abc import Sequence
from pathlib import Path
from typing import TYPE_CHECKING

from ..atomic import atomic_write

if TYPE_CHECKING:  # matplotlib itself is imported on first use: importing lorakit stays fast
    from matplotlib.axis import Axis
    from matplotlib.figure import Figure


def _pyplot():
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    return plt


def _integer_ticks(axis: Axis) -> None:
    from matplotlib.ticker import MaxNLocator

    axis.set_major_locator(MaxNLocator(integer=True))


def _save(fig: Figure, path: Path) -> Path:
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=110, format="png"))
    return path


def plot_similarity(
    panels: Sequence[tuple[str, Sequence[Sequence[float]]]],
    path: Path,
    title: str,
    y_label: str = "i",
    x_label: str = "j",
    columns: int = 3,
) -> Path:
    """Heat maps of φ grids: `panels` is [(panel title, grid with grid[i − 1][j − 1] = φ(i, j))]."""
    plt = _pyplot()
    columns = min(columns, len(panels))
    rows = math.ceil(len(panels) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.2 * columns, 2.6 * rows + 0.6), squeeze=False)
    image = None
    for ax, (name, grid) in zip(axes.flat, panels):
        r1, r2 = len(grid), len(grid[0])
        # Pixel centres at 1..r so that the ticks read as i and j.
        image = ax.imshow(
            grid,
            vmin=0.0,
            vmax=1.0,
            cmap="viridis",
            aspect="auto",
            interpolation="nearest",
            extent=(0.5, r2 + 0.5, r1 + 0.5, 0.5),
        )
        ax.set_title(name, fontsize=9)
        ax.set_xlabel(x_label, fontsize=8)
        ax.set_ylabel(y_label, fontsize=8)
        ax.tick_params(labelsize=7)
        _integer_ticks(ax.xaxis)
        _integer_ticks(ax.yaxis)
    for ax in list(axes.flat)[len(panels) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    if image is not None:
        fig.colorbar(image, ax=axes.ravel().tolist(), shrink=0.9, label="φ(i, j)")
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


def plot_spectra(
    groups: dict[str, list[tuple[str, Sequence[float]]]], path: Path, title: str, columns: int = 3
) -> Path:
    """Singular values of ΔW: `groups` maps a module kind to [(layer label, singular values, decreasing)]."""
    plt = _pyplot()
    columns = min(columns, len(groups))
    rows = math.ceil(len(groups) / columns)
    fig, axes = plt.subplots(rows, columns, figsize=(4.5 * columns, 3.2 * rows + 0.4), squeeze=False)
    for ax, (kind, lines) in zip(axes.flat, groups.items()):
        colours = plt.cm.viridis([k / max(1, len(lines) - 1) for k in range(len(lines))])
        for colour, (label, values) in zip(colours, lines):
            positive = [v for v in values if v > 0]
            if positive:
                ax.plot(range(1, len(positive) + 1), positive, "o-", ms=2.5, lw=1, color=colour, label=label)
        ax.set_yscale("log")
        ax.set_title(kind, fontsize=9)
        ax.set_xlabel("index i", fontsize=8)
        ax.set_ylabel("σᵢ(ΔW)", fontsize=8)
        ax.grid(alpha=0.3)
        ax.tick_params(labelsize=7)
        _integer_ticks(ax.xaxis)
        if 1 < len(lines) <= 12:
            ax.legend(fontsize=6, ncol=2)
    for ax in list(axes.flat)[len(groups) :]:
        ax.axis("off")
    fig.suptitle(title, fontsize=10)
    fig.tight_layout()
    try:
        return _save(fig, path)
    finally:
        plt.close(fig)


__all__ = ["plot_similarity", "plot_spectra"]
