"""GGUF tensor types: what each `--type` stores for each tensor, and the encoding into the bytes the `gguf`
package writes (its own quantizers for bf16, q8_0 and q4_0, so no llama.cpp build is needed).

As llama.cpp's converter does: 1-D tensors (norms) stay f32 whatever the type; a matrix whose rows are not a
whole number of quantization blocks (32 values for q8_0 and q4_0) falls back to f16. With q4_0 the token
embedding and the output head stay at q8_0, the higher precision llama.cpp's quantizer also gives them.
4-bit K-quants (Q4_K and the like) cannot be written: the `gguf` package only reads them.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import numpy as np
import torch

from .names import ExportError

Q = gguf.GGMLQuantizationType


@dataclass(frozen=True)
class GgufType:
    """One `--type`: the file type it declares and the tensor types of its matrices."""

    file_type: gguf.LlamaFileType
    matrices: gguf.GGMLQuantizationType
    embeddings: gguf.GGMLQuantizationType  # token_embd and output

    @property
    def quantized(self) -> bool:
        return self.matrices not in (Q.F32, Q.F16, Q.BF16)


GGUF_TYPES: dict[str, GgufType] = {
    "f32": GgufType(gguf.LlamaFileType.ALL_F32, Q.F32, Q.F32),
    "f16": GgufType(gguf.LlamaFileType.MOSTLY_F16, Q.F16, Q.F16),
    "bf16": GgufType(gguf.LlamaFileType.MOSTLY_BF16, Q.BF16, Q.BF16),
    "q8_0": GgufType(gguf.LlamaFileType.MOSTLY_Q8_0, Q.Q8_0, Q.Q8_0),
    "q4_0": GgufType(gguf.LlamaFileType.MOSTLY_Q4_0, Q.Q4_0, Q.Q8_0),
}
EMBEDDING_TENSORS = ("token_embd.weight", "output.weight")


def gguf_type(name: str) -> GgufType:
    if name not in GGUF_TYPES:
        raise ExportError(f"unknown GGUF type {name!r}; expected one of: {', '.join(GGUF_TYPES)}")
    return GGUF_TYPES[name]


def tensor_type(gguf_name: str, shape: tuple[int, ...], chosen: GgufType) -> gguf.GGMLQuantizationType:
    """The type tensor `gguf_name` of this shape is stored in under `chosen`."""
    if len(shape) < 2:
        return Q.F32
    wanted = chosen.embeddings if gguf_name in EMBEDDING_TENSORS else chosen.matrices
    block, _ = gguf.GGML_QUANT_SIZES[wanted]
    return wanted if shape[-1] % block == 0 else Q.F16


def encode(tensor: torch.Tensor, qtype: gguf.GGMLQuantizationType) -> np.ndarray:
    """The tensor's values as `gguf.GGUFWriter.add_tensor` takes them for `qtype` (pass `raw_dtype=qtype`
    for the block types, whose arrays are bytes)."""
    values = tensor.detach().to("cpu", torch.float32).contiguous().numpy()
    if qtype == Q.F32:
        return values
    if qtype == Q.F16:
        return values.astype(np.float16)
    return gguf.quants.quantize(values, qtype)
