"""Checkpoints of a training run: `<output>/checkpoints/step-N`, each holding the trained tensors (the
adapter folder, or the method's) and `trainer_state.pt` with the optimizer, scheduler and RNG states and
the metrics history, which is everything an exact resume needs.

A checkpoint is built in a temporary sibling folder, fsynced and renamed into place
(`lorakit.atomic.write_folder`), so a `step-N` folder is complete or absent, also after a crash or SIGKILL;
hidden leftovers of an interrupted write are removed by the next save. Only the last `keep` are kept.
Under several processes every rank takes part (FSDP shards are gathered) and rank 0 writes. On CUDA the
state also holds the CUDA RNG states, and in fp16 the loss scaler's.

The state holds only tensors, numbers, strings, lists and dicts, and is read with `weights_only=True`: a
checkpoint someone else wrote cannot run code, and a damaged one is refused (one line naming the file)
before the model or the optimizer changes.
"""

from __future__ import annotations

import os
import shutil
from dataclasses import dataclass, field, replace
from pathlib import Path
from typing import Any

import torch
from torch import nn

from ..atomic import write_folder
from ..methods import FineTuningMethod, method_of
from ..safe_files import check_finite
from .distributed import Parallel, load_optimizer_state, optimizer_state, unwrap

CHECKPOINT_DIR = "checkpoints"
STATE_FILE = "trainer_state.pt"


def cuda_rng_state(device: torch.device) -> list[torch.Tensor] | None:
    """The CUDA generators' states when the run computes on CUDA (dropout draws there), else None."""
    return torch.cuda.get_rng_state_all() if device.type == "cuda" else None


def latest_checkpoint(output_dir: str | os.PathLike) -> Path | None:
    """The complete checkpoint of the highest step under `output_dir`, if any."""
    folder = Path(output_dir) / CHECKPOINT_DIR
    complete = [p for p in folder.glob("step-*") if (p / STATE_FILE).is_file()] if folder.is_dir() else []
    return max(complete, key=lambda p: int(p.name.split("-")[1]), default=None)


def read_state(folder: Path) -> dict[str, Any]:
    """The trainer state of checkpoint `folder`, loaded with `weights_only=True` (no code runs) and checked."""
    file = folder / STATE_FILE
    try:
        saved = torch.load(file, map_location="cpu", weights_only=True)
    except Exception as err:  # torch raises many types for a damaged or hostile pickle
        raise ValueError(f"{file} cannot be read as a trainer state: {str(err).splitlines()[0]}") from None
    expected = {"step": int, "optimizer": dict, "scheduler": dict, "torch_rng": torch.Tensor, "history": list}
    if not isinstance(saved, dict) or any(not isinstance(saved.get(k), t) for k, t in expected.items()):
        raise ValueError(f"{file} is not a lorakit trainer state (expected {', '.join(expected)})")
    optimizer = saved["optimizer"]
    if not (
        isinstance(optimizer.get("state"), dict)
        and all(isinstance(entry, dict) for entry in optimizer["state"].values())
        and isinstance(optimizer.get("param_groups"), list)
        and isinstance(optimizer.get("names"), list)
    ):
        raise ValueError(f"{file}: the optimizer state is malformed")
    if saved["torch_rng"].dtype != torch.uint8 or saved["step"] < 0:
        raise ValueError(f"{file}: malformed RNG state or step")
    moments = {f"{name}.{key}": v for name, entry in saved["optimizer"]["state"].items() for key, v in entry.items()}
    check_finite({k: v for k, v in moments.items() if isinstance(v, torch.Tensor)}, file)
    return saved


@dataclass
class TrainingState:
    """What a checkpoint restores besides the trained tensors."""

    optimizer: torch.optim.Optimizer
    scheduler: torch.optim.lr_scheduler.LRScheduler
    step: int = 0  # optimizer steps finished
    # The RNG state at the start of step `step`: what a resume must restore, also when Ctrl-C lands in
    # the middle of a step whose dropout masks were already drawn.
    rng_state: torch.Tensor = field(default_factory=torch.get_rng_state)
    history: list[dict[str, Any]] = field(default_factory=list)  # every metrics entry so far
    cuda_rng: list[torch.Tensor] | None = None  # the CUDA RNG states at the start of step `step`, on CUDA
    scaler: torch.amp.GradScaler | None = None  # fp16's loss scaling
    seconds: float = 0.0  # wall time of the steps finished, summed over the parts of a resumed run


@dataclass
class Checkpointer:
    """Writes, restores and prunes the checkpoints of the run in `output`."""

    output: Path
    adapter_name: str = "default"
    adapter_meta: dict[str, Any] = field(default_factory=dict)  # extra fields of the saved config
    keep: int = 2
    parallel: Parallel = field(default_factory=Parallel)

    @property
    def folder(self) -> Path:
        return self.output / CHECKPOINT_DIR

    def save_trained(self, model: nn.Module, folder: Path) -> None:
        """The trained tensors: the method's folder when a method of lorakit.methods is applied, else the
        LoRA adapter. Every rank calls it; rank 0 writes."""
        self._method(model).save(model, folder, write=self.parallel.is_main, **self.adapter_meta)

    def restore_trained(self, model: nn.Module, folder: Path) -> None:
        """Put the trained tensors of `folder` into the model, before its optimizer is built (LoRA loads its
        adapter anew, so the optimizer must be built on the parameters that exist after this). The folder's
        trainer state is checked first, so a damaged checkpoint leaves the model as it was."""
        read_state(folder)
        self._method(model).restore(model, folder)

    def _method(self, model: nn.Module) -> FineTuningMethod:
        method = method_of(model, adapter=self.adapter_name)
        if method is None:
            raise ValueError("the model has neither a LoRA adapter nor a method of lorakit.methods to train")
        return method

    def restore_state(self, folder: Path, model: nn.Module, state: TrainingState) -> None:
        """Load the optimizer, scheduler and RNG states, step and history of checkpoint `folder`."""
        saved = read_state(folder)
        load_optimizer_state(model, state.optimizer, saved["optimizer"])
        state.scheduler.load_state_dict(saved["scheduler"])
        torch.set_rng_state(saved["torch_rng"])
        state.rng_state = saved["torch_rng"]
        state.step, state.history = saved["step"], saved["history"]
        state.seconds = float(saved.get("seconds", 0.0))  # checkpoints written before it was kept: unknown, 0
        if saved.get("cuda_rng") is not None and torch.cuda.is_available():
            torch.cuda.set_rng_state_all(saved["cuda_rng"])
            state.cuda_rng = saved["cuda_rng"]
        if state.scaler is not None and saved.get("scaler"):
            state.scaler.load_state_dict(saved["scaler"])

    def save(self, trained: nn.Module, state: TrainingState) -> Path:
        """Write `checkpoints/step-N` for the state's step. Every rank must call it; only rank 0 writes."""
        model = unwrap(trained)
        final = self.folder / f"step-{state.step:06d}"
        saved = {
            "step": state.step,
            "optimizer": optimizer_state(model, state.optimizer),
            "scheduler": state.scheduler.state_dict(),
            "torch_rng": state.rng_state,
            "history": state.history,
            "seconds": state.seconds,
        }
        if state.cuda_rng is not None:
            saved["cuda_rng"] = state.cuda_rng
        if state.scaler is not None:
            saved["scaler"] = state.scaler.state_dict()
        if self.parallel.is_main:
            self._drop_leftovers()
            write_folder(final, lambda tmp: self._write(model, tmp, saved))
            self._prune(final)
        else:
            self.save_trained(model, final)  # this rank's part of gathering the tensors; rank 0 writes
        self.parallel.barrier()
        return final

    def _write(self, model: nn.Module, folder: Path, saved: dict[str, Any]) -> None:
        self.save_trained(model, folder)
        torch.save(saved, folder / STATE_FILE)

    def _drop_leftovers(self) -> None:
        """Remove the hidden temporary folders of a save that was killed (only this run writes here)."""
        for leftover in self.folder.glob(".*") if self.folder.is_dir() else []:
            shutil.rmtree(leftover, ignore_errors=True)

    def save_interrupted(self, model: nn.Module, state: TrainingState) -> None:
        """The checkpoint written on Ctrl-C. The other processes are being interrupted too, at other points,
        so only a replicated model can be saved without them (FSDP's shards would need every process)."""
        if self.parallel.mode != "fsdp" and self.parallel.is_main:
            replace(self, parallel=Parallel()).save(model, state)

    def _prune(self, newest: Path) -> None:
        older = sorted((p for p in self.folder.glob("step-*") if p != newest), key=lambda p: p.name)
        for stale in older[: max(0, len(older) - (self.keep - 1))]:
            shutil.rmtree(stale, ignore_errors=True)
