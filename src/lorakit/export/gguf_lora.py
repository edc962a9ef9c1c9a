"""One LoRA adapter alone as the GGUF file llama.cpp loads with `--lora` (and Ollama with `ADAPTER`): the
layout of llama.cpp's `convert_lora_to_gguf.py`.

- Keys: `general.type = "adapter"`, `adapter.type = "lora"`, `adapter.lora.alpha` (float32), and the base's
  `general.architecture`.
- Tensors: `<GGUF weight name>.lora_a` holding A as (r, in) and `.lora_b` holding B as (out, r), so in
  llama.cpp's (ne0, ne1) order A is [in, r] and B is [r, out]; B's rows in llama.cpp's order for the weight
  (Llama's q and k rows are permuted, see `names.permute_rows`).
- llama.cpp adds (alpha / r)·B·A with one alpha for the file and r read from each B. A layer whose scaling is
  not alpha / r (rsLoRA, `rank_pattern`, `alpha_pattern`) gets its own factor folded into B, so every layer
  adds exactly what it adds in lorakit. PiSSA / OLoRA adapters are written as their plain-LoRA equivalent of
  the original base (rank 2r).

Refused, with the reason: DoRA (its update is not B·A), `modules_to_save` and trained biases (no place for
full tensors in a LoRA GGUF), adapters on embeddings or on a tied output head, architectures not in the name map.
"""

from __future__ import annotations

import os
from pathlib import Path

import gguf
import torch
from torch import nn

from ..layers import LoraLayer, is_linear_layer
from ..state import adapter_config, lora_layers
from .encoding import encode, gguf_type, tensor_type
from .files import write_gguf
from .names import ExportError, TensorNames

# The types llama.cpp's own converter writes LoRA files in.
LORA_TYPES = ("f32", "f16", "bf16", "q8_0")


def export_gguf_lora(model: nn.Module, path: str | os.PathLike, name: str = "default", type: str = "f32") -> Path:
    """Write adapter `name` of `model` (loaded on its base, e.g. with `lorakit.load_adapter`) as a llama.cpp LoRA
    GGUF at `path`, atomically. Returns the path; ExportError, with nothing written, for what cannot be exported."""
    if type not in LORA_TYPES:
        raise ExportError(f"a llama.cpp LoRA file is written in {', '.join(LORA_TYPES)}, not {type!r}")
    chosen = gguf_type(type)
    names = TensorNames(model.config)
    config = adapter_config(model, name)
    if config.use_dora:
        raise ExportError(
            "DoRA adapters cannot be written as a llama.cpp LoRA (their update is not B·A); "
            "export the merged model instead (--format gguf)"
        )
    if config.modules_to_save:
        raise ExportError(
            f"the adapter trains full copies of {config.modules_to_save} (modules_to_save), which "
            "a llama.cpp LoRA file cannot hold; export the merged model instead (--format gguf)"
        )
    if config.bias != "none":
        raise ExportError(
            f"the adapter trains biases (bias={config.bias!r}), which a llama.cpp LoRA file cannot "
            "hold; export the merged model instead (--format gguf)"
        )
    alpha = float(config.alpha)
    factors = [
        pair
        for path, layer in lora_layers(model)
        if name in layer.scaling
        for pair in _gguf_factors(names, path, layer, name, alpha)
    ]
    target = Path(path)

    def fill(writer: gguf.GGUFWriter) -> None:
        writer.add_type(gguf.GGUFType.ADAPTER)
        writer.add_string(gguf.Keys.Adapter.TYPE, "lora")
        writer.add_float32(gguf.Keys.Adapter.LORA_ALPHA, alpha)
        for tensor_name, value in factors:
            qtype = tensor_type(tensor_name, tuple(value.shape), chosen)
            writer.add_tensor(tensor_name, encode(value, qtype), raw_dtype=qtype)

    write_gguf(target, names.architecture.name, fill)
    return target


def _gguf_factors(
    names: TensorNames, path: str, layer: LoraLayer, name: str, alpha: float
) -> list[tuple[str, torch.Tensor]]:
    """(`<weight>.lora_a`, A), (`<weight>.lora_b`, B) of one layer, B scaled so that alpha / r · B·A is the
    layer's own update."""
    base = layer.base_layer
    if not is_linear_layer(base):
        raise ExportError(f"{path}: llama.cpp LoRA files hold adapters of linear layers, not {type(base).__name__}")
    weight = names.gguf_name(f"{path}.weight")
    if weight == "output.weight" and getattr(names.config, "tie_word_embeddings", False):
        raise ExportError(f"{path} shares its weight with the token embedding; llama.cpp has no output tensor to adapt")
    b, a = (t.detach().to("cpu", torch.float32) for t in layer.lora_factors(name))
    factor = layer.scaling[name] * b.shape[1] / alpha
    if factor != 1.0:
        b = b * factor
    return [(f"{weight}.lora_a", a.contiguous()), (f"{weight}.lora_b", names.to_gguf_rows(weight, b).contiguous())]
