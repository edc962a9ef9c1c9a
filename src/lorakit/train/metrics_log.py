"""The metrics of a training run: `metrics.jsonl` (one JSON object per logged step or evaluation),
optionally TensorBoard scalars under `<output>/tensorboard`, and the loss curve `loss.png` at the end.
Only the main process writes."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

from ..atomic import atomic_write

METRICS_FILE = "metrics.jsonl"


def _tensorboard_writer(output: Path) -> Any:
    try:
        from torch.utils.tensorboard import SummaryWriter  # optional dependency
    except ImportError:
        raise ValueError("TensorBoard logging needs the tensorboard package: pip install tensorboard") from None
    return SummaryWriter(log_dir=str(output / "tensorboard"))


def plot_losses(history: list[dict[str, Any]], path: Path) -> None:
    """Train and eval loss over the optimizer steps, as a PNG."""
    import matplotlib  # heavy import, needed once at the end of a run

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    train = [(h["step"], h["loss"]) for h in history if "loss" in h]
    evals = [(h["step"], h["eval_loss"]) for h in history if "eval_loss" in h]
    fig, ax = plt.subplots(figsize=(6, 3.5))
    if train:
        ax.plot(*zip(*train), label="train loss", lw=1.2)
    if evals:
        ax.plot(*zip(*evals), "o-", label="eval loss", lw=1.2)
    ax.set_xlabel("optimizer step")
    ax.set_ylabel("loss")
    ax.grid(alpha=0.3)
    ax.legend()
    fig.tight_layout()
    atomic_write(path, lambda tmp: fig.savefig(tmp, dpi=120, format="png"))
    plt.close(fig)


class MetricsLog:
    """Appends metrics entries to `history` (the run's, which checkpoints store) and to the outputs."""

    def __init__(self, output: Path, history: list[dict[str, Any]], *, write: bool, tensorboard: bool) -> None:
        self.output, self.history, self.write = output, history, write
        self.path = output / METRICS_FILE
        if write:  # rewritten from the (checkpoint's) history so it never holds a lost future
            self.path.write_text("".join(json.dumps(h) + "\n" for h in history))
        self.board = _tensorboard_writer(output) if tensorboard and write else None

    def record(self, entry: dict[str, Any]) -> None:
        self.history.append(entry)
        if self.write:
            with self.path.open("a") as fh:
                fh.write(json.dumps(entry) + "\n")
        if self.board is not None:
            for key, value in entry.items():
                if key != "step":
                    self.board.add_scalar(key, value, entry["step"])

    def close(self) -> None:
        """Draw the loss curve and close TensorBoard."""
        if self.write:
            plot_losses(self.history, self.output / "loss.png")
        if self.board is not None:
            self.board.close()

    def last_loss(self) -> float | None:
        losses = [h["loss"] for h in self.history if "loss" in h]
        return losses[-1] if losses else None
