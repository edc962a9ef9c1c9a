"""Autocast for the step simulation: `torch.autocast` does not act on meta tensors, so the simulated step
would run every matmul in its inputs' dtypes. `MetaAutocast` casts at the same calls autocast casts at,
above autograd as autocast does (the cast copies are what backward saves), with the op lists CPU autocast
uses for bfloat16/float16 (checked against it in tests/estimation):

* lower precision: linear, matmul, mm, bmm, addmm, baddbmm, scaled dot-product attention, convolutions —
  floating inputs cast to the compute dtype;
* float32: the losses (cross-entropy, NLL, MSE, ...) — inputs cast up;
* everything else (norms, softmax, SiLU, element-wise) runs in its inputs' dtype.

As autocast does, the low-precision copy of a trainable leaf tensor (a float32 master weight) is made once
and kept until the region ends, so it is alive for the whole forward pass.

It also enters `torch.autocast("cpu")`, whose state `layers.lora_function.autocast_dtype` reads for meta
tensors, so LoRA's fused product takes the path it takes under real autocast.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Any

import torch
import torch.nn.functional as F
from torch.overrides import TorchFunctionMode
from torch.utils._pytree import tree_map

LOWER_PRECISION: frozenset[Callable] = frozenset(
    {
        F.linear,
        torch.matmul,
        torch.Tensor.matmul,
        torch.Tensor.__matmul__,
        torch.Tensor.__rmatmul__,
        torch.mm,
        torch.Tensor.mm,
        torch.bmm,
        torch.Tensor.bmm,
        torch.addmm,
        torch.Tensor.addmm,
        torch.baddbmm,
        torch.Tensor.baddbmm,
        F.scaled_dot_product_attention,
        F.conv1d,
        F.conv2d,
        F.conv3d,
    }
)
FLOAT32: frozenset[Callable] = frozenset(
    {F.cross_entropy, F.nll_loss, F.mse_loss, F.l1_loss, F.smooth_l1_loss, F.binary_cross_entropy_with_logits}
)


CASTABLE = (torch.float32, torch.float16, torch.bfloat16)


class MetaAutocast(TorchFunctionMode):
    """Inside, the calls above cast their floating-point tensor arguments as autocast to `dtype` would."""

    def __init__(self, dtype: torch.dtype) -> None:
        super().__init__()
        self.dtype = dtype
        self.autocast = torch.autocast("cpu", dtype=dtype)
        # id of a trainable leaf -> (the leaf, its low-precision copy); the leaf is held, as autocast holds a weak
        # reference to it, so that its id is not reused by another tensor while cached (leaf views made inside
        # an autograd Function's forward, like the fused loss's chunks, come and go)
        self.cache: dict[int, tuple[torch.Tensor, torch.Tensor]] = {}

    def __enter__(self) -> MetaAutocast:
        self.autocast.__enter__()
        return super().__enter__()

    def __exit__(self, *exc: Any) -> None:
        self.cache.clear()
        super().__exit__(*exc)
        self.autocast.__exit__(*exc)

    def __torch_function__(self, func: Callable, types: Any, args: tuple = (), kwargs: dict | None = None) -> Any:
        kwargs = kwargs or {}
        if func in LOWER_PRECISION:
            args, kwargs = tree_map(lambda value: self._cast(value, self.dtype), (args, kwargs))
        elif func in FLOAT32:
            args, kwargs = tree_map(lambda value: self._cast(value, torch.float32), (args, kwargs))
        return func(*args, **kwargs)

    def _cast(self, value: Any, dtype: torch.dtype) -> Any:
        """`value` in `dtype` when it is a floating tensor of a castable dtype (autocast leaves float64 alone)."""
        if not isinstance(value, torch.Tensor) or value.dtype not in CASTABLE or value.dtype == dtype:
            return value
        if not (value.is_leaf and value.requires_grad and dtype == self.dtype):
            return value.to(dtype)
        if id(value) not in self.cache:
            self.cache[id(value)] = (value, value.to(dtype))
        return self.cache[id(value)][1]
