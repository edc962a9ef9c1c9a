"""The fast paths of a training step, switched on around it: gated MLPs that keep one of their three
intermediates fewer for the backward pass (`swiglu`), LoRA layers fed one input that compute their
down-projections together, and LoRA layers that own their input saving their dropped-out input in its place
(`layers.shared_input`). None changes a weight, a state dict or a result.

`enable_training_fast_paths` is the one place that says which paths a step runs with: the training loop
enters them (`training_fast_paths`, the same as a context), and so do the memory estimator's simulation, the
benchmarks and the tests that measure "the step `lorakit train` runs", so that what they measure is what
trains.
"""

from __future__ import annotations

from collections.abc import Callable, Iterator
from contextlib import contextmanager

from torch import nn

from ..layers.shared_input import group_shared_inputs, mark_input_owners, ungroup_shared_inputs, unmark_input_owners
from .swiglu import fuse_gated_mlps, unfuse_gated_mlps


def enable_training_fast_paths(model: nn.Module, sharded: bool = False) -> Callable[[], None]:
    """Give `model` lean gated MLPs, grouped down-projections and input owners; returns the function that takes
    them away.

    `sharded`: the model is sharded (FSDP), whose members' weights are gathered one module at a time, so
    layers are not grouped across modules there.
    """
    fused_mlps = fuse_gated_mlps(model)
    groups = [] if sharded else group_shared_inputs(model)
    owners = mark_input_owners(model)

    def undo() -> None:
        unmark_input_owners(owners)
        ungroup_shared_inputs(groups)
        unfuse_gated_mlps(fused_mlps)

    return undo


@contextmanager
def training_fast_paths(model: nn.Module, sharded: bool = False) -> Iterator[None]:
    """`enable_training_fast_paths` inside the block, `model` as it was afterwards."""
    undo = enable_training_fast_paths(model, sharded)
    try:
        yield
    finally:
        undo()
