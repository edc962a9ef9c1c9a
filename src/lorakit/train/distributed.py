"""Data-parallel training on torch.distributed, as launched by `torchrun` (or `accelerate launch`).

`Parallel` is what the training loop needs to know about the other processes: its rank, how to split a
global micro-batch between ranks, how to wrap the model (DDP: replicated base, gradients all-reduced for
the trainable adapter parameters only; FSDP2 `fully_shard`: every decoder block's parameters, frozen
base included, sharded across ranks) and how to gather what only rank 0 writes.

DDP wraps `LossOf(model)`, whose forward is the training loss (`train.loss.causal_lm_loss`, the fused LM-head
loss included): DDP's gradient hooks need the forward pass to go through the wrapped module, and the loss
is what the loop wants from it. `training_loss` is the one call the loop makes, wrapped or not.

Gradients are exchanged once per optimizer step: the micro-batches before the last one of a step
accumulate locally (DDP `no_sync`, FSDP2 `set_requires_gradient_sync(False)`). In bf16/fp16, FSDP2 runs
with a mixed-precision policy: parameters all-gathered in the compute dtype, gradients reduced in float32
onto the float32 (master) adapter shards. Dropout differs between ranks: each rank reseeds its RNG at every
step from (seed, step, rank), so a run resumed with the same number of processes draws the same masks.

Checkpoints hold full (unsharded) tensors keyed by parameter name, so a run can resume with a different
number of processes, or none.
"""

from __future__ import annotations

import hashlib
import os
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass
from datetime import timedelta
from typing import Any

import torch
import torch.distributed as dist
from torch import nn

from ..io import unsharded
from .loss import causal_lm_loss

MODES = ("ddp", "fsdp")


@dataclass
class Parallel:
    mode: str = "none"  # "none", "ddp" or "fsdp"
    rank: int = 0
    world: int = 1

    @property
    def is_main(self) -> bool:
        return self.rank == 0

    @property
    def active(self) -> bool:
        return self.world > 1 or self.mode != "none"

    def local_part(self, indices: list[int]) -> tuple[list[int], bool]:
        """This rank's share of a global micro-batch, and whether it is real. A rank left without examples
        still runs one (weighted 0) so that every rank takes part in the gradient reduction."""
        part = indices[self.rank :: self.world]
        return (part, True) if part else (indices[:1], False)

    def barrier(self) -> None:
        if self.active:
            dist.barrier()

    def sum(self, *values: float) -> list[float]:
        if not self.active:
            return list(values)
        tensor = torch.tensor(values, dtype=torch.float64)
        dist.all_reduce(tensor)
        return tensor.tolist()

    def gather(self, items: list[Any]) -> list[Any]:
        """Concatenate every rank's list, rank by rank (on all ranks)."""
        if not self.active:
            return items
        parts: list[list[Any]] = [[] for _ in range(self.world)]
        dist.all_gather_object(parts, items)
        return [item for part in parts for item in part]

    def wrap(self, model: nn.Module, compute_dtype: torch.dtype = torch.float32) -> nn.Module:
        """The module to run forward/backward on. FSDP shards `model` in place and returns it; below float32
        it all-gathers parameters in `compute_dtype` and reduces gradients in float32."""
        if self.mode == "ddp":
            from torch.nn.parallel import DistributedDataParallel

            device_ids = [torch.cuda.current_device()] if torch.cuda.is_available() else None
            return DistributedDataParallel(LossOf(model), device_ids=device_ids)
        if self.mode == "fsdp":
            from torch.distributed.device_mesh import init_device_mesh
            from torch.distributed.fsdp import MixedPrecisionPolicy, fully_shard

            mesh = init_device_mesh("cuda" if torch.cuda.is_available() else "cpu", (self.world,))
            policy = MixedPrecisionPolicy()
            if compute_dtype != torch.float32:
                policy = MixedPrecisionPolicy(param_dtype=compute_dtype, reduce_dtype=torch.float32)
            for block in _repeated_blocks(model):
                fully_shard(block, mesh=mesh, mp_policy=policy)
            fully_shard(model, mesh=mesh, mp_policy=policy)
        return model

    @contextmanager
    def gradient_sync(self, trained: nn.Module, sync: bool) -> Iterator[None]:
        """Backward passes inside exchange gradients between processes only if `sync` (the last micro-batch
        of an optimizer step); otherwise they accumulate locally, and the step's last backward reduces the
        sum. `trained` is what `wrap` returned."""
        if sync or not self.active:
            yield
        elif self.mode == "ddp":
            with trained.no_sync():  # type: ignore[operator]
                yield
        else:
            trained.set_requires_gradient_sync(False)  # type: ignore[operator]
            try:
                yield
            finally:
                trained.set_requires_gradient_sync(True)  # type: ignore[operator]

    def seed_step(self, seed: int, step: int) -> None:
        """Under several processes, seed this rank's RNG (CPU and every GPU) for optimizer step `step`: the ranks
        draw different dropout masks, and a resumed run draws the ones the uninterrupted run drew. One process
        keeps its single stream (saved in checkpoints), so nothing changes there."""
        if self.world > 1:
            torch.manual_seed(step_seed(seed, step, self.rank))


def step_seed(seed: int, step: int, rank: int) -> int:
    """A 63-bit seed for (run seed, step, rank), from a hash so that nearby triples give unrelated streams."""
    digest = hashlib.blake2b(f"{seed}:{step}:{rank}".encode(), digest_size=8).digest()
    return int.from_bytes(digest, "little") >> 1


def _repeated_blocks(model: nn.Module) -> list[nn.Module]:
    """The transformer blocks: members of the longest nn.ModuleList (model.layers, encoder.layer, h, ...)."""
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList)]
    if not lists:
        return []
    longest: nn.ModuleList = max(lists, key=len)
    return list(longest)


class LossOf(nn.Module):
    """`model` with the training loss as its forward: `LossOf(model)(**batch) == causal_lm_loss(model, batch)`."""

    def __init__(self, model: nn.Module) -> None:
        super().__init__()
        self.module = model

    def forward(self, label_smoothing: float = 0.0, **batch: torch.Tensor) -> torch.Tensor:
        return causal_lm_loss(self.module, batch, label_smoothing)


def training_loss(trained: nn.Module, batch: dict[str, torch.Tensor], label_smoothing: float = 0.0) -> torch.Tensor:
    """The mean loss of `batch` on what `Parallel.wrap` returned (through DDP's forward when it wraps)."""
    if isinstance(getattr(trained, "module", None), LossOf):
        return trained(label_smoothing=label_smoothing, **batch)
    return causal_lm_loss(trained, batch, label_smoothing)


def unwrap(model: nn.Module) -> nn.Module:
    """The model inside what `Parallel.wrap` returned."""
    inner = getattr(model, "module", model)
    return inner.module if isinstance(inner, LossOf) else inner


def optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer) -> dict[str, Any]:
    """Optimizer state keyed by parameter name with full tensors (collective under FSDP)."""
    names = _optimizer_names(model, optimizer)
    raw = optimizer.state_dict()
    state = {
        names[index]: {k: unsharded(v).detach().cpu() if torch.is_tensor(v) else v for k, v in entry.items()}
        for index, entry in raw["state"].items()
    }
    # Each group keeps the names of its parameters (LoRA+ has two groups with different learning rates).
    groups = [
        {**{k: v for k, v in group.items() if k != "params"}, "param_names": [names[i] for i in group["params"]]}
        for group in raw["param_groups"]
    ]
    return {"state": state, "param_groups": groups, "names": names}


def load_optimizer_state(model: nn.Module, optimizer: torch.optim.Optimizer, saved: dict[str, Any]) -> None:
    names = _optimizer_names(model, optimizer)
    if sorted(names) != sorted(saved["names"]):
        raise ValueError("the checkpoint's optimizer state is for other trainable parameters")
    params = dict(unwrap(model).named_parameters())
    state = {}
    for index, name in enumerate(names):
        if name not in saved["state"]:
            continue
        param = params[name]
        state[index] = {
            k: _like(v, param) if torch.is_tensor(v) and v.dim() > 0 else v for k, v in saved["state"][name].items()
        }
    position = {name: index for index, name in enumerate(names)}
    groups = [
        {
            **{k: v for k, v in group.items() if k != "param_names"},
            "params": [position[n] for n in group.get("param_names", saved["names"])],
        }
        for group in saved["param_groups"]
    ]
    optimizer.load_state_dict({"state": state, "param_groups": groups})


def _like(value: torch.Tensor, param: torch.Tensor) -> torch.Tensor:
    """A full tensor placed like `param` (sharded the same way when `param` is an FSDP DTensor)."""
    if hasattr(param, "device_mesh"):
        from torch.distributed.tensor import DTensor, distribute_tensor  # only sharded runs need it

        assert isinstance(param, DTensor)
        return distribute_tensor(value.to(param.dtype), param.device_mesh, param.placements)
    return value.to(device=param.device, dtype=param.dtype)


def _optimizer_names(model: nn.Module, optimizer: torch.optim.Optimizer) -> list[str]:
    """Parameter names in the optimizer's own order (its groups in turn): the indices of its state_dict."""
    by_id = {id(p): name for name, p in unwrap(model).named_parameters()}
    return [by_id[id(p)] for group in optimizer.param_groups for p in group["params"]]


def init_parallel(mode: str | None = None, timeout_s: float = 600.0) -> Parallel:
    """Join the process group that torchrun described in the environment (WORLD_SIZE, RANK, MASTER_ADDR).

    One process without a mode is plain training. Collectives time out after `timeout_s`, so a process
    that dies makes the others fail with an error rather than wait forever.
    """
    world = int(os.environ.get("WORLD_SIZE", "1"))
    if mode in (None, "none") and world == 1:
        return Parallel()
    mode = mode if mode not in (None, "none") else "ddp"
    if mode not in MODES:
        raise ValueError(f"unknown distributed mode {mode!r}; expected one of {MODES}")
    if "RANK" not in os.environ:
        raise ValueError(
            f"--distributed {mode} needs a launcher: torchrun --nproc-per-node N -m lorakit train ... "
            "(or accelerate launch)"
        )
    if not dist.is_initialized():
        backend = "nccl" if torch.cuda.is_available() else "gloo"
        if torch.cuda.is_available():
            torch.cuda.set_device(int(os.environ.get("LOCAL_RANK", "0")))
        dist.init_process_group(backend, timeout=timedelta(seconds=timeout_s))
    return Parallel(mode=mode, rank=dist.get_rank(), world=dist.get_world_size())


def shutdown(parallel: Parallel) -> None:
    if parallel.active and dist.is_initialized():
        dist.destroy_process_group()
