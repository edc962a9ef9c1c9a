"""A whole model as one GGUF file for llama.cpp / Ollama: the weights in the chosen type under llama.cpp's
tensor names and row order, the architecture's hyper-parameters, and the tokenizer with its chat template.

The model is exported as it is: a model with LoRA layers is refused (merge it first, e.g. with
`lorakit.merge_and_unload`), so what is written is exactly what the caller's model computes. A quantized
(QLoRA) base is refused unless `dequantize=True`, which writes its decoded weights.
"""

from __future__ import annotations

import os
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import gguf
import torch
from torch import nn

from ..quant import quantized_layers
from ..state import lora_layers
from .encoding import GgufType, encode, gguf_type, tensor_type
from .files import write_gguf
from .names import ExportError, TensorNames
from .vocab import gguf_vocab, write_vocab


def export_gguf(
    model: nn.Module,
    tokenizer: Any,
    path: str | os.PathLike,
    type: str = "f16",
    dequantize: bool = False,
) -> Path:
    """Write `model` (a transformers causal LM of an architecture in `lorakit.export.names.ARCHITECTURES`) and
    its fast tokenizer as a GGUF file of `type` (f32, f16, bf16, q8_0, q4_0) at `path`, atomically. Returns the
    path. ExportError (a ValueError), with nothing written, for what cannot be exported."""
    chosen = gguf_type(type)
    config: Any = model.config
    names = TensorNames(config)
    _check_exportable(model, dequantize)
    vocab = gguf_vocab(tokenizer, config.vocab_size)
    tensors = [(names.gguf_name(key), value) for key, value in _float_tensors(model)]
    target = Path(path)

    def fill(writer: gguf.GGUFWriter) -> None:
        _write_hyperparameters(writer, config, chosen)
        write_vocab(writer, vocab)
        for gguf_name, value in tensors:
            qtype = tensor_type(gguf_name, tuple(value.shape), chosen)
            writer.add_tensor(gguf_name, encode(names.to_gguf_rows(gguf_name, value.detach()), qtype), raw_dtype=qtype)

    write_gguf(target, names.architecture.name, fill)
    return target


def _check_exportable(model: nn.Module, dequantize: bool) -> None:
    if any(True for _ in lora_layers(model)):
        raise ExportError("the model still has LoRA layers: merge them first (lorakit.merge_and_unload)")
    if not dequantize and any(True for _ in quantized_layers(model)):
        raise ExportError(
            "the model has a quantized (QLoRA) base; GGUF export writes float or GGUF-quantized weights, "
            "so pass dequantize=True (--dequantize) to export its decoded weights"
        )
    config = model.config
    if getattr(config, "attention_bias", False) or getattr(config, "mlp_bias", False):
        raise ExportError("GGUF export of llama models with attention or MLP biases is not supported")
    rope = getattr(config, "rope_parameters", None) or {}
    if rope.get("rope_type", "default") != "default":
        raise ExportError(f"GGUF export does not write rope scaling ({rope.get('rope_type')!r})")


def _float_tensors(model: nn.Module) -> Iterator[tuple[str, torch.Tensor]]:
    """The model's weights by transformers name; a quantized layer's weight decoded; a tied output head once
    (llama.cpp reuses token_embd when there is no output tensor)."""
    decoded = {f"{path}.": layer for path, layer in quantized_layers(model)}
    tied = bool(getattr(model.config, "tie_word_embeddings", False))
    for key, value in model.state_dict().items():
        owner = next((prefix for prefix in decoded if key.startswith(prefix)), None)
        if owner is not None and key != f"{owner}bias":
            continue  # codes and scales: the decoded weight follows below
        if tied and key == "lm_head.weight":
            continue
        yield key, value
    for prefix, layer in decoded.items():
        yield f"{prefix}weight", layer.weight


def _write_hyperparameters(writer: gguf.GGUFWriter, config: Any, chosen: GgufType) -> None:
    """llama.cpp's `llama.*` keys, as its converter writes them for a transformers Llama config."""
    heads = config.num_attention_heads
    head_dim = getattr(config, "head_dim", None) or config.hidden_size // heads
    rope = getattr(config, "rope_parameters", None) or {}
    writer.add_type(gguf.GGUFType.MODEL)
    writer.add_name(Path(getattr(config, "_name_or_path", "") or "model").name or "model")
    writer.add_context_length(config.max_position_embeddings)
    writer.add_embedding_length(config.hidden_size)
    writer.add_block_count(config.num_hidden_layers)
    writer.add_feed_forward_length(config.intermediate_size)
    writer.add_head_count(heads)
    writer.add_head_count_kv(getattr(config, "num_key_value_heads", None) or heads)
    writer.add_rope_dimension_count(head_dim)
    writer.add_rope_freq_base(float(rope.get("rope_theta", getattr(config, "rope_theta", 10000.0))))
    writer.add_layer_norm_rms_eps(config.rms_norm_eps)
    writer.add_vocab_size(config.vocab_size)
    if head_dim != config.hidden_size // heads:
        writer.add_key_length(head_dim)
        writer.add_value_length(head_dim)
    writer.add_file_type(chosen.file_type)
    if chosen.quantized:
        writer.add_quantization_version(gguf.GGML_QUANT_VERSION)
