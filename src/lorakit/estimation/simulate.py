"""Training steps played on the meta device: the memory timeline and the FLOPs, from the architecture.

The model (built on `meta`, so it holds no data) runs the step `lorakit train` runs — the real transformers
forward pass with the training loop's lean gated MLPs (`train.swiglu`) and its loss (`train.loss`, the
fused LM-head cross-entropy where it applies), under autocast below float32 (`autocast.MetaAutocast`), then
the backward pass, gradient clipping and optimizer step (after the optimizer state was created, as in any
step but the first) — on a batch of B × T meta tokens. Meta tensors carry shapes and dtypes but no storage,
so this costs milliseconds per layer whatever the model size. Meanwhile

* `LiveBytes` (a dispatch mode) sees every tensor an operation creates and, through a finalizer on its
  storage, the moment the storage is freed: the live bytes over time, split into activations (anything
  the step creates: saved tensors and temporaries), gradients and optimizer state, and their peak;
* the same mode adds up the FLOPs of every matmul, convolution and attention kernel with PyTorch's
  FLOP formulas (those of `torch.utils.flop_counter`).

Attention: on a real CPU, `scaled_dot_product_attention` runs a fused (flash) kernel that saves only
Q, K, V, the output and the log-sum-exp, unless dropout is on during training, where it falls back to
the math path, which materialises and saves the B × heads × T × T probabilities (and the dropout mask).
On meta the math path would always be taken, so `_AttentionBackend` sends each call to the kernel the
target device would pick: PyTorch's own CPU choice (`torch._fused_sdp_choice`) for `device="cpu"`,
always a fused kernel for `device="cuda"` (flash / memory-efficient attention support dropout there).

Not seen: memory a kernel allocates internally (e.g. matmul workspaces), allocator caching and
fragmentation, and the framework itself; the calibration against measured peaks is in the README.
"""

from __future__ import annotations

import weakref
from collections.abc import Callable
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import Any

import torch
import torch.fx.experimental._config as fx_config
from torch import nn
from torch.utils._python_dispatch import TorchDispatchMode
from torch.utils._pytree import tree_leaves
from torch.utils.flop_counter import flop_registry, sdpa_backward_flop_count, sdpa_flop_count, shape_wrapper

from ..train.fast_paths import training_fast_paths
from ..train.loss import causal_lm_loss
from .autocast import MetaAutocast

ACTIVATIONS, GRADIENTS, OPTIMIZER = "activations", "gradients", "optimizer"
_FLASH = 1  # torch.nn.attention.SDPBackend.FLASH_ATTENTION
_aten = torch.ops.aten


@dataclass
class StepProfile:
    """What one simulated training step needs, beyond the weights the model already holds."""

    peak_bytes: int  # live bytes at the step's peak (weights not included)
    at_peak: dict[str, int]  # that peak split into activations / gradients / optimizer
    activation_peak_bytes: int  # the most activation bytes (saved tensors + temporaries) alive at once
    flops: int  # forward + backward (the optimizer's elementwise work is not counted)
    forward_flops: int
    attention_path: str  # "fused", "math" or "none"
    notes: list[str] = field(default_factory=list)


class LiveBytes(TorchDispatchMode):
    """Bytes of the storages created under this mode that are still alive, by kind, and their peak."""

    def __init__(self, preexisting: list[torch.Tensor]) -> None:
        super().__init__()
        self.kind = ACTIVATIONS
        self.owned: dict[int, list] = {}  # storage id -> [kind, bytes]
        self.known = {t.untyped_storage()._cdata for t in preexisting}
        self.live = {ACTIVATIONS: 0, GRADIENTS: 0, OPTIMIZER: 0}
        self.total = 0
        self.peak = 0
        self.at_peak = dict(self.live)
        self.activation_peak = 0
        self.flops = 0

    def __torch_dispatch__(self, func, types, args=(), kwargs=None):
        if func is _aten._local_scalar_dense.default and args[0].device.type == "meta":
            # A data-dependent check (`mask.all()`, "is this batch packed?"). Meta tensors hold no values;
            # a boolean answers True, which is the real answer for a full-length batch without padding.
            if args[0].dtype == torch.bool:
                return True
            raise RuntimeError("the model's forward pass reads a tensor's value, which has none on the meta device")
        out = func(*args, **(kwargs or {}))
        count = _FLOP_FORMULAS.get(func.overloadpacket)
        if count is not None:
            self.flops += count(*args, **(kwargs or {}), out_val=out)
        for tensor in tree_leaves(out):
            if isinstance(tensor, torch.Tensor):
                self._own(tensor)
        return out

    def reset_peak(self) -> None:
        self.peak = self.total
        self.at_peak = dict(self.live)
        self.activation_peak = self.live[ACTIVATIONS]

    def _own(self, tensor: torch.Tensor) -> None:
        storage = tensor.untyped_storage()
        key = storage._cdata
        if key in self.known or key in self.owned:
            return  # a view or an in-place result of something already counted (or a weight)
        nbytes = storage.nbytes()
        self.owned[key] = [self.kind, nbytes]
        self._change(self.kind, nbytes)
        weakref.finalize(storage, self._release, key)

    def _release(self, key: int) -> None:
        kind, nbytes = self.owned.pop(key)
        self._change(kind, -nbytes)

    def _change(self, kind: str, nbytes: int) -> None:
        self.live[kind] += nbytes
        self.total += nbytes
        if nbytes > 0:
            if self.total > self.peak:
                self.peak = self.total
                self.at_peak = dict(self.live)
            if kind == ACTIVATIONS and self.live[ACTIVATIONS] > self.activation_peak:
                self.activation_peak = self.live[ACTIVATIONS]

    def mark(self, tensor: torch.Tensor | None, kind: str) -> None:
        """Re-label a counted storage (an activation that became a parameter's .grad)."""
        if tensor is None:
            return
        entry = self.owned.get(tensor.untyped_storage()._cdata)
        if entry is not None and entry[0] != kind:
            self.live[entry[0]] -= entry[1]
            self.live[kind] += entry[1]
            entry[0] = kind


class _AttentionBackend:
    """While active, `F.scaled_dot_product_attention` on meta tensors runs the kernel the target device would
    use. (A module attribute swap rather than a TorchFunctionMode: modes are off during the backward pass,
    where gradient checkpointing recomputes attention. Real tensors go to the original function.)"""

    def __init__(self, device: str) -> None:
        self.device = device
        self.paths: set[str] = set()
        self._original: Callable[..., torch.Tensor] | None = None

    def __enter__(self) -> _AttentionBackend:
        self._original = torch.nn.functional.scaled_dot_product_attention
        original = self._original

        def routed(*args, **kwargs):
            return self._call(original, *args, **kwargs)

        torch.nn.functional.scaled_dot_product_attention = routed
        return self

    def __exit__(self, *exc) -> None:
        if self._original is not None:
            torch.nn.functional.scaled_dot_product_attention = self._original

    def _call(self, original, *args, **kwargs):
        names = ("query", "key", "value", "attn_mask", "dropout_p", "is_causal", "scale", "enable_gqa")
        params: dict[str, Any] = {
            "attn_mask": None,
            "dropout_p": 0.0,
            "is_causal": False,
            "scale": None,
            "enable_gqa": False,
        }
        params.update(dict(zip(names, args)))
        params.update(kwargs)
        if params["query"].device.type != "meta":
            return original(*args, **kwargs)
        if torch.is_autocast_enabled("cpu"):  # MetaAutocast: attention is on autocast's lower-precision list
            dtype = torch.get_autocast_dtype("cpu")
            for name in ("query", "key", "value", "attn_mask"):
                if isinstance(params[name], torch.Tensor) and params[name].is_floating_point():
                    params[name] = params[name].to(dtype)
            args, kwargs = (), {name: params[name] for name in names if name in params}
        q, k, v = params["query"], params["key"], params["value"]
        if q.dim() != 4 or not self._fused(params):
            self.paths.add("math")
            return original(*args, **kwargs)
        self.paths.add("fused")
        out, _ = _aten._scaled_dot_product_flash_attention_for_cpu(
            q,
            k,
            v,
            float(params["dropout_p"]),
            bool(params["is_causal"]),
            attn_mask=params["attn_mask"],
            scale=params["scale"],
        )
        return out

    def _fused(self, params: dict) -> bool:
        if self.device == "cuda":
            return True

        def stand_in(t: Any) -> Any:
            # A real CPU tensor of the same shape, dtype and last-dimension stride, backed by one row.
            if t is None or t.dim() == 0:
                return t if t is None else torch.empty((), dtype=t.dtype)
            row = torch.empty(t.shape[-1] * max(t.stride(-1), 1), dtype=t.dtype)[:: max(t.stride(-1), 1)]
            return row.expand(t.shape)

        try:
            choice = torch._fused_sdp_choice(
                stand_in(params["query"]),
                stand_in(params["key"]),
                stand_in(params["value"]),
                attn_mask=stand_in(params["attn_mask"]),
                dropout_p=float(params["dropout_p"]),
                is_causal=bool(params["is_causal"]),
                scale=params["scale"],
                enable_gqa=bool(params["enable_gqa"]),
            )
        except (RuntimeError, TypeError):
            return False
        return choice == _FLASH


def _addmm_inplace_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * b_shape[1]


def _baddbmm_inplace_flops(self_shape, a_shape, b_shape, *args, **kwargs) -> int:
    return 2 * a_shape[0] * a_shape[1] * a_shape[2] * b_shape[2]


def _flash_cpu_flops(query, key, value, *args, out_shape=None, **kwargs) -> int:  # arguments arrive as shapes
    return sdpa_flop_count(query, key, value)


def _flash_cpu_backward_flops(grad_out, query, key, value, *args, out_shape=None, **kwargs) -> int:
    return sdpa_backward_flop_count(grad_out, query, key, value)


# PyTorch's FLOP formulas (those FlopCounterMode uses: matmuls, convolutions, attention kernels) plus
# the CPU flash-attention kernel and in-place matmuls (lorakit.quant's backward). Counted inside
# `LiveBytes` rather than under FlopCounterMode, whose module hooks keep tensors alive longer.
_FLOP_FORMULAS = {
    **flop_registry,
    **{
        op: shape_wrapper(f)
        for op, f in {
            _aten.addmm_: _addmm_inplace_flops,
            _aten.baddbmm_: _baddbmm_inplace_flops,
            _aten._scaled_dot_product_flash_attention_for_cpu: _flash_cpu_flops,
            _aten._scaled_dot_product_flash_attention_for_cpu_backward: _flash_cpu_backward_flops,
        }.items()
    },
}


def simulate_training(
    model: nn.Module,
    make_batch: Callable[[], dict[str, torch.Tensor]],
    optimizer: str = "adamw",
    device: str = "cpu",
    max_grad_norm: float | None = 1.0,
    precision: torch.dtype = torch.float32,
) -> StepProfile:
    """Play one steady-state training step (forward, backward, clipping, optimizer step, zero_grad) on meta,
    the forward under autocast to `precision` below float32.

    `make_batch` returns the model's keyword arguments (meta tensors).
    """
    params = list({id(p): p for p in model.parameters()}.values())
    trainable = [p for p in params if p.requires_grad]
    weights = params + list(model.buffers())
    tracker = LiveBytes(weights)
    attention = _AttentionBackend(device)
    hooks = [p.register_post_accumulate_grad_hook(lambda p: tracker.mark(p.grad, GRADIENTS)) for p in trainable]
    try:
        with training_fast_paths(model), attention, tracker:
            opt = _make_optimizer(trainable, optimizer, device) if trainable else None
            if opt is not None:
                _create_optimizer_state(opt, trainable, tracker)
            tracker.flops = 0
            batch = make_batch()  # held through the step, like the training loop's batch
            # The fused loss selects the target tokens with a mask; every token of a simulated batch is one.
            with (
                MetaAutocast(precision) if precision != torch.float32 else nullcontext(),
                fx_config.patch(meta_nonzero_assume_all_nonzero=True),  # type: ignore[attr-defined]
            ):
                loss = causal_lm_loss(model, batch)
            forward_flops = tracker.flops
            if trainable:
                loss.backward()
            flops_total = tracker.flops
            del loss
            if opt is not None:
                if max_grad_norm:
                    torch.nn.utils.clip_grad_norm_(trainable, max_grad_norm)
                tracker.kind = OPTIMIZER
                opt.step()
                tracker.kind = ACTIVATIONS
                opt.zero_grad(set_to_none=True)
            del opt, batch
    finally:
        for hook in hooks:
            hook.remove()
    paths = attention.paths
    return StepProfile(
        peak_bytes=tracker.peak,
        at_peak=tracker.at_peak,
        activation_peak_bytes=tracker.activation_peak,
        flops=int(flops_total),
        forward_flops=int(forward_flops),
        attention_path="none" if not paths else "/".join(sorted(paths)),
    )


def _create_optimizer_state(opt: torch.optim.Optimizer, trainable: list[nn.Parameter], tracker: LiveBytes) -> None:
    """The optimizer state as a first step leaves it (created from zero gradients), so that the one simulated
    step after it is a steady-state step: the state is alive throughout."""
    tracker.kind = OPTIMIZER
    for param in trainable:
        param.grad = torch.zeros_like(param)
    opt.step()
    opt.zero_grad(set_to_none=True)
    tracker.kind = ACTIVATIONS
    tracker.reset_peak()


def _make_optimizer(params: list[nn.Parameter], name: str, device: str) -> torch.optim.Optimizer:
    # PyTorch's per-tensor implementation on CPU; the multi-tensor ("foreach") one, with its larger
    # temporaries, on CUDA: what each device gets by default.
    foreach = device == "cuda"
    if name == "adamw":
        return torch.optim.AdamW(params, lr=1e-4, foreach=foreach)
    if name == "sgd":
        return torch.optim.SGD(params, lr=1e-3, momentum=0.9, foreach=foreach)
    raise ValueError(f"unknown optimizer {name!r}; expected adamw or sgd")
