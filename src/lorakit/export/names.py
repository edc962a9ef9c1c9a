"""Which architectures export to GGUF, and how a transformers tensor becomes a GGUF one: its name under
llama.cpp's convention (`model.layers.0.self_attn.q_proj.weight` → `blk.0.attn_q.weight`, from the `gguf`
package's own tensor name map) and the row order llama.cpp expects.

llama.cpp's `convert_hf_to_gguf.py` permutes the rows of Llama's q and k projections: each head's rotary
pairs go from transformers' "rotate half" order (first half, second half) to interleaved pairs. transformers'
GGUF loader undoes it on load (`LlamaTensorProcessor._reverse_permute_weights`); `permute_rows` is the
forward permutation, applied to the weights of the merged model and to the rows of a LoRA B matrix alike.
"""

from __future__ import annotations

from dataclasses import dataclass

import gguf
import torch


class ExportError(ValueError):
    """A model, adapter or option that cannot be exported in the format asked, with the reason."""


@dataclass(frozen=True)
class GgufArchitecture:
    """How one transformers `model_type` is written: llama.cpp's architecture and the rows it permutes."""

    name: str  # general.architecture
    arch: gguf.MODEL_ARCH
    permuted: tuple[str, ...]  # GGUF tensor kinds whose rows are permuted (see permute_rows)


ARCHITECTURES: dict[str, GgufArchitecture] = {
    "llama": GgufArchitecture("llama", gguf.MODEL_ARCH.LLAMA, permuted=("attn_q", "attn_k")),
}


def architecture_of(config) -> GgufArchitecture:
    """The GGUF architecture of a transformers config; ExportError for one the name map does not know."""
    model_type = getattr(config, "model_type", None)
    if model_type not in ARCHITECTURES:
        raise ExportError(
            f"GGUF export knows the architectures {sorted(ARCHITECTURES)}, not {model_type!r} "
            "(its tensor names and layouts for llama.cpp are not mapped)"
        )
    return ARCHITECTURES[model_type]


class TensorNames:
    """transformers parameter name → GGUF tensor name for one model (its architecture and depth)."""

    def __init__(self, config) -> None:
        self.architecture = architecture_of(config)
        self.config = config
        self._map = gguf.get_tensor_name_map(self.architecture.arch, config.num_hidden_layers)
        self._kinds = {_kind(gguf.TENSOR_NAMES[kind]) for kind in gguf.MODEL_TENSORS[self.architecture.arch]}

    def gguf_name(self, hf_name: str) -> str:
        """`blk.N.attn_q.weight` for `model.layers.N.self_attn.q_proj.weight`; ExportError for a tensor llama.cpp's
        architecture has no place for."""
        module, _, suffix = hf_name.rpartition(".")
        base = self._map.get_name(module)
        if base is None or _kind(base) not in self._kinds:
            raise ExportError(f"{hf_name} has no GGUF tensor name in llama.cpp's {self.architecture.name} architecture")
        return f"{base}.{suffix}"

    def to_gguf_rows(self, gguf_name: str, rows: torch.Tensor) -> torch.Tensor:
        """`rows` (a weight, a bias, or a LoRA B: anything whose first dimension is the output) in llama.cpp's
        row order for the tensor `gguf_name`."""
        kind = _kind(gguf_name)
        if kind not in self.architecture.permuted:
            return rows
        heads = self.config.num_attention_heads
        if kind == "attn_k":
            heads = getattr(self.config, "num_key_value_heads", None) or heads
        return permute_rows(rows, heads)


def _kind(gguf_name: str) -> str:
    """`attn_q` for `blk.3.attn_q.weight` or `blk.{bid}.attn_q`; `token_embd` for `token_embd.weight`."""
    parts = gguf_name.split(".")
    return parts[2] if parts[0] == "blk" else parts[0]


def permute_rows(rows: torch.Tensor, heads: int) -> torch.Tensor:
    """llama.cpp's `LlamaModel.permute`: within each of `heads` blocks of rows, the two halves (transformers'
    rotate-half pairs i and i + d/2) become interleaved (rows 2i and 2i + 1)."""
    head_dim = rows.shape[0] // heads
    if head_dim * heads != rows.shape[0] or head_dim % 2:
        raise ExportError(f"cannot split {rows.shape[0]} rows into {heads} heads of an even size")
    return rows.reshape(heads, 2, head_dim // 2, *rows.shape[1:]).swapaxes(1, 2).reshape(rows.shape)
