"""The training fast path of a LoRA update: s·B·A·dropout(x) as one autograd function that saves less.

With `nn.Dropout` → `nn.Linear(A)` → `nn.Linear(B)`, autograd keeps, per adapted layer, a boolean mask and a
dropped-out float copy of the input (A's weight gradient needs it), and draws the mask with PyTorch's
Bernoulli sampler, which on CPU costs about as much as a 576×576 matrix product per call. Here:

* the mask comes from 64-bit random words cut into 16-bit lanes (keep a lane when it is below a
  threshold), about 3× cheaper to draw (1.4 against 3.9 ms at 512 × 576 on a 2-core AMD EPYC,
  `bench/dropout_mask.py`), from a seed taken from the global generator (so runs stay reproducible and
  resumable);
* the saved tensors are one input-sized tensor and the r-wide product A·dropout(x); no mask is kept. Which
  input-sized tensor depends on who else keeps x. Where nothing else does (a group of q, k and v computing
  their down-projection together, a gated MLP's down_proj: `layers/shared_input.py`), the layer saves the
  dropped-out input, its dropped elements stored as −0.0 and kept zeros as +0.0 (`mark_dropped`), and reads
  the mask back from those values in the backward pass (`kept_elements`: one comparison). Otherwise (q, k and
  v computing alone share x; o_proj's x is saved by the attention kernel) it saves x itself, at no cost, and
  draws the mask again from its seed in the backward pass.

Under `torch.autocast` the function runs too, as autocast would run the two matmuls: x, A and B are cast to
the autocast dtype, the products and the saved tensors are in that dtype, and the gradients go back in each
input's own dtype (float32 for float32 master factors). The mask is drawn on x's device by a generator on
that device.

The backward pass's products whose result is r wide (grad·B, and gradᵀ·down: B's gradient) are computed
transposed, r rows long instead of r columns wide (`narrow_product`): as autograd's matmul writes them they
ran 1.5–3.7× slower in float32 and 3.8–5.9× in bfloat16 at r = 8 on a 2-core AMD EPYC (`bench/narrow_product.py`). The
forward pass's x·Aᵀ, with A stored as r × in rows, is as fast as written.

The keep probability is quantised to 1/65536 (at p = 0.05 the effective drop rate differs from p by less
than 1e-5) and the kept values are scaled by the exact inverse of the effective keep rate, so the update is
unbiased. Gradients equal those of the plain composition with the same mask (tested in float64).
"""

from __future__ import annotations

from contextlib import nullcontext

import torch

_LANES = 65536  # 16-bit lanes: the keep probability's resolution


def narrow_product(wide: torch.Tensor, narrow_t: torch.Tensor) -> torch.Tensor:
    """wide @ narrow_tᵀ for a narrow right factor given as its transpose, computed as (narrow_t @ wideᵀ)ᵀ.

    Semantics: wide (..., K), narrow_t (r, K) with r small (a LoRA rank) -> (..., r), equal to
    `wide @ narrow_t.t()`; the result is a transposed view of an r × M tensor (M = the product of wide's
    leading dimensions). The GEMM writes r long rows instead of M rows of r values, which the CPU's kernels
    run several times faster (see the module docstring). How narrow_t is best laid out depends on the kernel
    and dtype; measured (bench/narrow_product.py): contiguous rows for B (grad·B), the transposed view of a
    contiguous M × r `down` for B's gradient."""
    rows = wide.reshape(-1, wide.shape[-1])
    return (narrow_t @ rows.t()).t().view(*wide.shape[:-1], narrow_t.shape[0])


def low_rank_product(x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float) -> torch.Tensor:
    """scaling · (x @ Aᵀ) @ Bᵀ without gradient bookkeeping of its own, the scaling folded into B (out × r):
    the same operations, in the same order, as `LoraDropoutProduct` without dropout, so that a frozen start
    subtracted from it (PiSSA / OLoRA) cancels exactly."""
    return (x @ a.t()) @ (b.t() * scaling)


def keep_threshold(p: float) -> tuple[int, float]:
    """(threshold on a signed 16-bit lane, scale of the kept values) for drop probability `p`."""
    keep = round((1.0 - p) * _LANES)
    return keep - _LANES // 2, _LANES / keep


def keep_mask(seed: int, shape: torch.Size, p: float, device: torch.device) -> torch.Tensor:
    """The boolean keep mask of `shape` drawn from `seed` (kept with probability ≈ 1 − p): same seed, same mask."""
    threshold, _ = keep_threshold(p)
    count = shape.numel()
    words = torch.empty((count + 3) // 4, dtype=torch.int64, device=device)
    if device.type != "meta":  # `lorakit estimate` runs this on the meta device: same tensors, no values
        generator = torch.Generator(device=device).manual_seed(seed)
        # Every bit random: from int64's minimum with no upper bound, PyTorch writes the generator's raw 64-bit
        # words (no modulo: 18 % less time than with an explicit upper bound); `random_()` would leave the top
        # bit of every word 0.
        words.random_(-(2**63), None, generator=generator)
    return words.view(torch.int16)[:count].view(shape) < threshold


# The signed integer type of each float type's width: −0.0 is the integer minimum in its bits (only the sign set).
_SAME_WIDTH_INT = {
    torch.float64: torch.int64,
    torch.float32: torch.int32,
    torch.bfloat16: torch.int16,
    torch.float16: torch.int16,
}


def mark_dropped(x: torch.Tensor, keep: torch.Tensor) -> torch.Tensor:
    """x where `keep`, −0.0 elsewhere, with kept −0.0 values made +0.0 (the same numbers): the one tensor from
    which both the dropped-out input and the mask (`kept_elements`) are read."""
    marked = x + 0.0  # a copy in which −0.0 became +0.0, every other value as it was
    negative_zero = torch.full((), -0.0, dtype=x.dtype, device=x.device)
    return torch.where(keep, marked, negative_zero, out=marked)  # in place: no second input-sized tensor


def kept_elements(marked: torch.Tensor) -> torch.Tensor:
    """The keep mask of a `mark_dropped` tensor: every element that is not −0.0."""
    int_type = _SAME_WIDTH_INT[marked.dtype]
    return marked.view(int_type) != torch.iinfo(int_type).min


class LoraDropoutProduct(torch.autograd.Function):
    """scaling · (dropout(x) @ Aᵀ) @ Bᵀ with the mask drawn from `seed` (p = 0: no mask), computed in
    `dtype` (x's dtype when None; the autocast dtype under autocast), gradients in each input's dtype.

    Scalars are folded into the small tensors (A, B: r × in, out × r; the r-wide product), so the only
    passes over input-sized tensors are the mask's draw and `mark_dropped` in the forward pass, one comparison
    and one `where` in the backward pass, and none over the output.
    """

    @staticmethod
    def forward(
        ctx,
        x: torch.Tensor,
        a: torch.Tensor,
        b: torch.Tensor,
        scaling: float,
        p: float,
        seed: int,
        dtype: torch.dtype | None = None,
        owns_input: bool = False,
    ) -> torch.Tensor:
        ctx.dtypes = (x.dtype, a.dtype, b.dtype)
        dtype = dtype or x.dtype
        x, a, b = x.to(dtype), a.to(dtype), b.to(dtype)
        _set_dropout(ctx, p, seed, owns_input)
        with _no_autocast(x):
            saved_input, down = _dropout_down(ctx, x, a)
            out = down @ (b.t() * scaling)
        ctx.save_for_backward(saved_input, a, b, down)
        ctx.scaling = scaling
        return out

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        saved_input, a, b, down = ctx.saved_tensors
        x_dtype, a_dtype, b_dtype = ctx.dtypes
        with _no_autocast(saved_input):
            grads = _product_grads(ctx, saved_input, a, b, down, grad_out.to(saved_input.dtype))
        grad_x, grad_a, grad_b = _in_dtypes(grads, (x_dtype, a_dtype, b_dtype))
        return grad_x, grad_a, grad_b, None, None, None, None, None


def _in_dtypes(grads, dtypes: tuple[torch.dtype, ...]) -> tuple[torch.Tensor | None, ...]:
    """The gradients (computed in the compute dtype) in their inputs' own dtypes; None stays None."""
    return tuple(None if g is None else g.to(d) for g, d in zip(grads, dtypes))


def _no_autocast(x: torch.Tensor):
    """A context that turns autocast off on x's device: the function chose its dtype already."""
    return (
        torch.autocast(x.device.type, enabled=False)
        if x.device.type in ("cpu", "cuda", "mps", "xpu")
        else nullcontext()
    )


def _set_dropout(ctx, p: float, seed: int, owns_input: bool) -> None:
    """Record the dropout of a forward pass in `ctx`: p, the mask's seed, the scale of kept values, and whether
    the saved input is the marked dropped-out input (`owns_input`, p > 0) or x itself."""
    ctx.p, ctx.seed, ctx.marked = p, seed, owns_input and p > 0
    ctx.keep_scale = keep_threshold(p)[1] if p > 0 else 1.0


def _dropout_down(ctx, x: torch.Tensor, a: torch.Tensor) -> tuple[torch.Tensor, torch.Tensor]:
    """(the input tensor to save, keep_scale · (dropout(x) @ Aᵀ)) for the dropout recorded in `ctx`: the saved
    tensor is `mark_dropped`'s dropped-out input when `ctx.marked`, else x."""
    if ctx.p == 0:
        return x, x @ a.t()
    keep = keep_mask(ctx.seed, x.shape, ctx.p, x.device)
    dropped = mark_dropped(x, keep) if ctx.marked else torch.where(keep, x, 0.0)
    return (dropped if ctx.marked else x), (dropped @ a.t()) * ctx.keep_scale


def _product_grads(
    ctx, saved_input: torch.Tensor, a: torch.Tensor, b: torch.Tensor, down: torch.Tensor, grad_out: torch.Tensor
):
    """(grad x, grad A, grad B) of `LoraDropoutProduct` in the compute dtype (None where not needed)."""
    needs = ctx.needs_input_grad
    grad_down, grad_b = _up_grads(grad_out, b, down, ctx.scaling, needs[2])
    grad_x, grad_a = _down_grads(ctx, saved_input, a, grad_down, needs[0], needs[1])
    return grad_x, grad_a, grad_b


def _up_grads(grad_out: torch.Tensor, b: torch.Tensor, down: torch.Tensor, scaling: float, need_b: bool):
    """(grad down, grad B) of up = scaling · down @ Bᵀ given grad_out (grad B None unless `need_b`)."""
    grad_down = narrow_product(grad_out, (b * scaling).t().contiguous())
    grad_b = None
    if need_b:
        down_rows = down.reshape(-1, down.shape[-1]).t()
        grad_b = narrow_product(grad_out.reshape(-1, grad_out.shape[-1]).t(), down_rows) * scaling
    return grad_down, grad_b


def _down_grads(ctx, saved_input: torch.Tensor, a: torch.Tensor, grad_down: torch.Tensor, need_x: bool, need_a: bool):
    """(grad x, grad A) of down = keep_scale · (dropout(x) @ Aᵀ) given grad_down and the saved input, the mask
    read from it (`ctx.marked`) or drawn again from the seed in `ctx` (None where not needed)."""
    keep, dropped = None, saved_input
    if ctx.p > 0:
        keep = (
            kept_elements(saved_input)
            if ctx.marked
            else keep_mask(ctx.seed, saved_input.shape, ctx.p, saved_input.device)
        )
    grad_x = grad_a = None
    if need_x:
        grad_x = grad_down @ (a * ctx.keep_scale)
        if keep is not None:
            grad_x = torch.where(keep, grad_x, 0.0)
    if need_a:
        if keep is not None and not ctx.marked:
            dropped = torch.where(keep, saved_input, 0.0)
        rows = dropped.reshape(-1, dropped.shape[-1])
        grad_a = (grad_down.reshape(-1, grad_down.shape[-1]).t() @ rows) * ctx.keep_scale
    return grad_x, grad_a


class LoraSharedProduct(torch.autograd.Function):
    """The low-rank outputs of several adapters that read one input x (`layers/shared_input.py`), with one
    dropout mask: out_i = s_i · (dropout(x) @ A_iᵀ) @ B_iᵀ, computed through one down-projection
    dropout(x) @ [A_1; …; A_n]ᵀ. Arguments after `scalings`: A_1 … A_n, then B_1 … B_n; returns the n
    outputs. Computed in `dtype` (x's dtype when None), gradients in each input's dtype. The group is the one
    reader of x that saves it, so this saves the dropped-out input (`mark_dropped`), the stacked A, the r-wide
    product and the B's. One autograd node for the group, where a down-projection node and one up-projection
    node per member would each add their Python overhead to every step."""

    FACTORS_FROM = 5  # the arguments before the factors: x, p, seed, dtype, scalings

    @staticmethod
    def forward(ctx, x: torch.Tensor, p: float, seed: int, dtype: torch.dtype | None, scalings, *factors):
        count = len(scalings)
        ctx.dtypes = (x.dtype, *(f.dtype for f in factors))
        dtype = dtype or x.dtype
        a = torch.cat([f.to(dtype) for f in factors[:count]])
        bs = [f.to(dtype) for f in factors[count:]]
        ctx.ranks, ctx.scalings = [f.shape[0] for f in factors[:count]], scalings
        _set_dropout(ctx, p, seed, owns_input=True)
        with _no_autocast(x):
            saved_input, down = _dropout_down(ctx, x.to(dtype), a)
            outs = tuple(d @ (b.t() * s) for d, b, s in zip(down.split(ctx.ranks, -1), bs, scalings))
        ctx.save_for_backward(saved_input, a, down, *bs)
        return outs

    @staticmethod
    def backward(ctx, *grad_outs: torch.Tensor):
        saved_input, a, down, *bs = ctx.saved_tensors
        count, first_a = len(bs), LoraSharedProduct.FACTORS_FROM
        needs_x, needs_a, needs_b = (
            ctx.needs_input_grad[0],
            ctx.needs_input_grad[first_a : first_a + count],
            ctx.needs_input_grad[first_a + count :],
        )
        with _no_autocast(saved_input):
            ups = [
                _up_grads(g.to(down.dtype), b, d, s, need_b)
                for g, b, d, s, need_b in zip(grad_outs, bs, down.split(ctx.ranks, -1), ctx.scalings, needs_b)
            ]
            grad_down = torch.cat([grad_d for grad_d, _ in ups], -1)
            grad_x, grad_a = _down_grads(ctx, saved_input, a, grad_down, needs_x, any(needs_a))
        grad_as = grad_a.split(ctx.ranks) if grad_a is not None else [None] * count
        grads = _in_dtypes((grad_x, *grad_as, *(grad_b for _, grad_b in ups)), ctx.dtypes)
        return grads[0], *[None] * (first_a - 1), *grads[1:]


def autocast_dtype(x: torch.Tensor) -> torch.dtype | None:
    """The dtype autocast gives matmuls on x's device, or None when autocast is off there."""
    device_type = x.device.type
    if device_type == "meta":  # `lorakit estimate` simulates a CPU step on meta tensors (estimation.autocast)
        device_type = "cpu"
    if not torch.is_autocast_enabled(device_type):
        return None
    return torch.get_autocast_dtype(device_type)


def dropout_seed(p: float) -> int:
    """A mask seed drawn from the global (CPU) generator when p > 0 (without a device sync), else 0."""
    return int(torch.randint(0, 2**62, (1,)).item()) if p > 0 else 0


def lora_dropout_product(
    x: torch.Tensor, a: torch.Tensor, b: torch.Tensor, scaling: float, p: float, owns_input: bool = False
) -> torch.Tensor:
    """The fast path of a training step, in autocast's dtype under autocast (else in x's dtype, which the caller
    matches to the factors'). `owns_input`: nothing else keeps x for the backward pass (see the module docstring)."""
    return LoraDropoutProduct.apply(x, a, b, scaling, p, dropout_seed(p), autocast_dtype(x), owns_input)


def lora_shared_product(
    x: torch.Tensor, a_list: list[torch.Tensor], b_list: list[torch.Tensor], scalings: list[float], p: float
) -> tuple[torch.Tensor, ...]:
    """`LoraSharedProduct`'s outputs with gradients, in autocast's dtype under autocast (else x's)."""
    return LoraSharedProduct.apply(x, p, dropout_seed(p), autocast_dtype(x), tuple(scalings), *a_list, *b_list)
