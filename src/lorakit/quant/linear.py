"""`QuantLinear`: a frozen linear layer whose weight is stored quantized (NF4 or 8-bit), its codecs by
method name, and the QuantLinear layers of a model (`quantized_layers`).

The quantized weight lives in buffers, not Parameters: it is not trained, gets no gradient and no
optimizer state, yet moves with `.to(device)` and is part of `state_dict()` (so a plain safetensors save
of the model holds it). The bias, if any, stays a float Parameter (frozen unless an adapter trains it).

The forward computes x·Wᵀ (+ b) through `_DequantMatmul`, a custom autograd Function that decodes W a
few rows at a time, multiplies, and drops each decoded chunk. It saves only the quantized buffers for the
backward pass and decodes the chunks again there to form the input gradient ∂L/∂x = ∂L/∂y · W; it never
keeps a float copy of W and computes no gradient for W. Nothing in it depends on grad mode: running it
under `torch.no_grad()` (an eval pass, `generate`) changes no state, so training afterwards still
back-propagates through every layer.
"""

from __future__ import annotations

from collections.abc import Iterator

import torch
from torch import nn

from .int8 import Int8Codec
from .nf4 import BLOCK_SIZE, NF4Codec

METHODS = ("nf4", "int8", "int8-asym")
Codec = NF4Codec | Int8Codec


def make_codec(method: str, block_size: int = BLOCK_SIZE, double_quant: bool = True) -> Codec:
    """The storage format for `method`: "nf4" (block_size, double_quant apply), "int8" or "int8-asym"."""
    if method == "nf4":
        if block_size <= 0 or block_size % 2:
            raise ValueError(f"NF4 block size must be a positive even number, got {block_size}")
        return NF4Codec(block_size=block_size, double_quant=double_quant)
    if method in ("int8", "int8-asym"):
        return Int8Codec(zero_point=method == "int8-asym")
    raise ValueError(f"unknown quantization method {method!r}; expected one of: {', '.join(METHODS)}")


def codec_from_spec(spec: dict) -> Codec:
    """Inverse of `codec.spec()` (used when loading a saved quantized model)."""
    return make_codec(spec["method"], spec.get("block_size", BLOCK_SIZE), spec.get("double_quant", True))


def _decoded_chunks(
    codec: Codec, buffers: dict[str, torch.Tensor], in_features: int, out_features: int, rows: int, dtype: torch.dtype
):
    """(first row, last row + 1, decoded rows in `dtype`) for consecutive row ranges of the weight."""
    for start in range(0, out_features, rows):
        stop = min(start + rows, out_features)
        yield start, stop, codec.decode_rows(buffers, start, stop, in_features).to(dtype)


class _DequantMatmul(torch.autograd.Function):
    """y = x·Wᵀ with W decoded chunk by chunk; only x gets a gradient (W is frozen)."""

    @staticmethod
    def forward(ctx, x: torch.Tensor, layout: tuple, *buffers: torch.Tensor) -> torch.Tensor:
        codec, names, in_features, out_features, rows = layout
        named = dict(zip(names, buffers))
        flat = x.reshape(-1, in_features)
        parts = [flat @ w.t() for _, _, w in _decoded_chunks(codec, named, in_features, out_features, rows, x.dtype)]
        out = parts[0] if len(parts) == 1 else torch.cat(parts, dim=1)
        # The buffers are the packed weight itself (no copy); x is not needed since W gets no gradient.
        ctx.save_for_backward(*buffers)
        ctx.layout = layout
        ctx.x_shape = x.shape
        return out.view(*x.shape[:-1], out_features)

    @staticmethod
    def backward(ctx, grad_out: torch.Tensor):
        codec, names, in_features, out_features, rows = ctx.layout
        nones = (None,) * (1 + len(names))
        if not ctx.needs_input_grad[0]:
            return (None, *nones)
        named = dict(zip(names, ctx.saved_tensors))
        grad = grad_out.reshape(-1, out_features)
        grad_x = grad.new_zeros(grad.shape[0], in_features)
        for start, stop, w in _decoded_chunks(codec, named, in_features, out_features, rows, grad.dtype):
            grad_x.addmm_(grad[:, start:stop], w)  # ∂L/∂x = Σ_chunks ∂L/∂y[:, rows] · W[rows, :]
        return (grad_x.view(ctx.x_shape), *nones)


class QuantLinear(nn.Module):
    """A linear layer with a quantized, frozen weight. Build with `QuantLinear.from_linear(linear, "nf4")`
    (or `lorakit.quantize(model, ...)`); the constructor alone makes an empty layer to load a state dict into.
    """

    # Decoded weight elements per chunk in forward/backward (16 MiB in fp32). Small layers are one chunk;
    # only very large ones are split, bounding the float temporaries whatever the layer size.
    chunk_elements: int = 1 << 22

    def __init__(
        self,
        in_features: int,
        out_features: int,
        method: str = "nf4",
        *,
        bias: bool = True,
        dtype: torch.dtype = torch.float32,
        device: torch.device | str | None = None,
        block_size: int = BLOCK_SIZE,
        double_quant: bool = True,
    ) -> None:
        super().__init__()
        self.in_features = in_features
        self.out_features = out_features
        self.codec = make_codec(method, block_size, double_quant)
        self.compute_dtype = dtype  # the original weight's dtype: what `dequantize()` returns by default
        empty = self.codec.empty(out_features, in_features, device)
        self._quant_names = tuple(empty)
        for name, tensor in empty.items():
            self.register_buffer(name, tensor)
        if bias:
            self.bias = nn.Parameter(torch.zeros(out_features, dtype=dtype, device=device), requires_grad=False)
        else:
            self.register_parameter("bias", None)

    @classmethod
    def from_linear(
        cls, linear: nn.Linear, method: str = "nf4", *, block_size: int = BLOCK_SIZE, double_quant: bool = True
    ) -> QuantLinear:
        """Quantize `linear`'s weight; its bias Parameter is kept as is (same object, now frozen)."""
        weight = linear.weight
        layer = cls(
            linear.in_features,
            linear.out_features,
            method,
            bias=False,
            dtype=weight.dtype,
            device="meta",
            block_size=block_size,
            double_quant=double_quant,
        )
        for name, tensor in layer.codec.encode(weight).items():
            layer.register_buffer(name, tensor.contiguous())
        if linear.bias is not None:
            layer.bias = linear.bias
            layer.bias.requires_grad_(False)
        return layer

    # -- the stored weight ----------------------------------------------------------------------
    @property
    def method(self) -> str:
        return self.codec.name

    def quant_buffers(self) -> dict[str, torch.Tensor]:
        return {name: buffer for name, buffer in self.named_buffers(recurse=False) if name in self._quant_names}

    def quantized_bytes(self) -> int:
        """Bytes of the stored weight (codes and every scale); the bias is not included."""
        return sum(t.numel() * t.element_size() for t in self.quant_buffers().values())

    def bits_per_weight(self) -> float:
        return 8 * self.quantized_bytes() / (self.in_features * self.out_features)

    def _rows_per_chunk(self) -> int:
        return max(1, self.chunk_elements // max(1, self.in_features))

    def dequantize(self, dtype: torch.dtype | None = None) -> torch.Tensor:
        """The whole weight decoded, (out × in), as a new tensor. For merging and export; the forward never
        builds it."""
        dtype = dtype or self.compute_dtype
        chunks = [
            w
            for _, _, w in _decoded_chunks(
                self.codec, self.quant_buffers(), self.in_features, self.out_features, self._rows_per_chunk(), dtype
            )
        ]
        return chunks[0] if len(chunks) == 1 else torch.cat(chunks)

    @property
    def weight(self) -> torch.Tensor:
        # Code that inspects `.weight` (dtype/device checks, LoRA set-up) gets a decoded temporary copy;
        # writing to it does not change the layer (use `quantize_`).
        return self.dequantize()

    @torch.no_grad()
    def quantize_(self, weight: torch.Tensor) -> None:
        """Re-quantize from a float (out × in) weight, in place (same buffer objects, device and dtypes)."""
        if tuple(weight.shape) != (self.out_features, self.in_features):
            raise ValueError(
                f"weight of shape {tuple(weight.shape)} does not fit a {self.out_features}×{self.in_features} layer"
            )
        current = self.quant_buffers()
        for name, tensor in self.codec.encode(weight.to(next(iter(current.values())).device)).items():
            current[name].copy_(tensor)

    def to_linear(self, dtype: torch.dtype | None = None) -> nn.Linear:
        """A plain nn.Linear holding the decoded weight (in `dtype`, default the original dtype)."""
        dtype = dtype or self.compute_dtype
        weight = self.dequantize(dtype)
        linear = nn.Linear(self.in_features, self.out_features, bias=self.bias is not None, device="meta")
        linear.weight = nn.Parameter(weight, requires_grad=False)
        if self.bias is not None:
            linear.bias = nn.Parameter(self.bias.detach().to(dtype).clone(), requires_grad=self.bias.requires_grad)
        return linear

    # -- module behaviour -----------------------------------------------------------------------
    def forward(self, x: torch.Tensor) -> torch.Tensor:
        buffers = self.quant_buffers()
        layout = (self.codec, tuple(buffers), self.in_features, self.out_features, self._rows_per_chunk())
        out = _DequantMatmul.apply(x, layout, *buffers.values())
        return out if self.bias is None else out + self.bias.to(out.dtype)

    def _apply(self, fn, recurse: bool = True):
        # `model.half()` / `.to(bfloat16)` would also cast the fp32 scales (an int8 row scale 127/absmax
        # can exceed float16's range). The storage format is fixed: buffers may change device, never dtype.
        originals = {name: t for name, t in self._buffers.items() if t is not None}
        super()._apply(fn, recurse)
        for name, original in originals.items():
            moved = self._buffers[name]
            if moved is not None and moved.dtype != original.dtype:
                self._buffers[name] = original.to(device=moved.device)
        if self.bias is not None:
            self.compute_dtype = self.bias.dtype  # a float cast of the module changes its compute dtype
        else:
            self.compute_dtype = fn(torch.zeros((), dtype=self.compute_dtype)).dtype
        return self

    def extra_repr(self) -> str:
        spec = ", ".join(f"{k}={v}" for k, v in self.codec.spec().items())
        return f"in_features={self.in_features}, out_features={self.out_features}, bias={self.bias is not None}, {spec}"


def quantized_layers(model: nn.Module) -> Iterator[tuple[str, QuantLinear]]:
    """Every QuantLinear of the model (also those inside LoRA wrappers, as `<path>.base_layer`)."""
    for path, module in model.named_modules():
        if isinstance(module, QuantLinear):
            yield path, module


def is_quantized(model: nn.Module) -> bool:
    return any(True for _ in quantized_layers(model))


__all__ = ["METHODS", "QuantLinear", "codec_from_spec", "is_quantized", "make_codec", "quantized_layers"]
