"""The figures read off a prepared meta model without running it: bytes of weights, gradients and optimizer
state, the CPU allocator's slack, the rule-of-thumb FLOPs, and the size of the file a method writes."""

from __future__ import annotations

import json
import math
from dataclasses import dataclass
from typing import Any

import torch
from torch import nn

from ..layers import is_linear_layer
from ..methods.base import text_config

OPTIMIZERS = {"adamw": 2, "sgd": 1}  # state tensors per trainable parameter
DEVICES = ("cpu", "cuda")
# CPU only. glibc's malloc keeps freed blocks for reuse, so the resident memory at the peak exceeds the live
# tensors by (bytes, share of the activation peak). Fitted on 12 peaks of the step `lorakit train` runs, measured
# by bench/estimate_vs_measured.py (SmolLM2-135M and MiniLM-L6 × full / LoRA / QLoRA at batch 4×128 in fp32;
# MiniLM also at 8×256 in fp32 and 4×128 in bf16): for each kind, the pair that minimises the largest relative
# error of the total over its measurements (full ±5.3 %, frozen ±9.6 %, quantized ±11.3 %; the README's table).
# Full fine-tuning keeps least for its activations: its gradients are allocated into the blocks the activations
# free during the backward pass. A quantized base keeps most: it decodes its weights into temporaries in every
# forward and backward pass. Adapter, prefix, prompt and BitFit use the frozen-base figures (not measured).
CPU_MALLOC_SLACK = {"full": (70_000_000, 0.30), "frozen": (0, 0.53), "quantized": (0, 0.62)}
# Plus what the first training step sets up besides tensors (autograd graph, oneDNN / OpenMP buffers;
# measured 28 to 99 MB above the simulated tensor peak with an allocator that returns freed memory at once).
CPU_RUNTIME_BYTES = 40_000_000


@dataclass
class Weights:
    """Parameter counts and the bytes every training step holds besides activations."""

    trainable_parameters: int
    every_parameter_trains: bool  # full fine-tuning's memory profile (see CPU_MALLOC_SLACK)
    frozen_bytes: int  # frozen parameters and every buffer (quantized weights are buffers)
    trainable_bytes: int
    optimizer_bytes: int

    @property
    def static_bytes(self) -> int:
        """Weights, gradients (one per trainable element) and optimizer state."""
        return self.frozen_bytes + 2 * self.trainable_bytes + self.optimizer_bytes


def weights(model: nn.Module, optimizer: str) -> Weights:
    params = unique_parameters(model)
    trainable = [p for p in params if p.requires_grad]
    trainable_bytes = sum(nbytes(p) for p in trainable)
    frozen = sum(nbytes(p) for p in params if not p.requires_grad) + sum(nbytes(b) for b in model.buffers())
    return Weights(
        sum(p.numel() for p in trainable),
        len(trainable) == len(params),
        frozen,
        trainable_bytes,
        OPTIMIZERS[optimizer] * trainable_bytes,
    )


def unique_parameters(model: nn.Module) -> list[nn.Parameter]:
    return list({id(p): p for p in model.parameters()}.values())


def nbytes(t: torch.Tensor) -> int:
    return t.numel() * t.element_size()


def allocator_bytes(kind: str, activation_bytes: int, device: str) -> int:
    """What the CPU allocator holds beyond the live tensors (see CPU_MALLOC_SLACK); 0 on cuda."""
    fixed, share = CPU_MALLOC_SLACK[kind]
    return round(CPU_RUNTIME_BYTES + fixed + share * activation_bytes) if device == "cpu" else 0


def flops_rule(model: nn.Module, tokens: int, batch_size: int) -> int:
    """6·N·tokens for trained linear weights, 4·N·tokens for frozen ones (forward + input gradients), plus
    attention's 12 · layers · B · T² · d; N counts the weights of every linear map."""
    frozen_matmul = trained_matmul = 0
    for module in model.modules():
        if not is_linear_layer(module) or any(is_linear_layer(child) for child in module.children()):
            continue  # a LoRA layer's base layer, A and B are linear maps of their own
        weight = dict(module.named_parameters(recurse=False)).get("weight")
        if weight is None:  # a quantized weight: codes in buffers, frozen
            shape: Any = module
            frozen_matmul += shape.in_features * shape.out_features
        elif weight.requires_grad:
            trained_matmul += weight.numel()
        else:
            frozen_matmul += weight.numel()
    config = text_config(model)
    seq = tokens // batch_size
    attention = 12 * config.num_hidden_layers * batch_size * seq * seq * config.hidden_size
    return 6 * trained_matmul * tokens + 4 * frozen_matmul * tokens + attention


_SAFETENSORS_DTYPES = {
    torch.float32: "F32",
    torch.float16: "F16",
    torch.bfloat16: "BF16",
    torch.int8: "I8",
    torch.uint8: "U8",
    torch.int64: "I64",
    torch.int32: "I32",
    torch.float64: "F64",
}


def safetensors_size(tensors: dict[str, torch.Tensor], metadata: dict[str, str] | None = None) -> int:
    """Bytes of the safetensors file holding `tensors` (meta tensors are fine: only shapes are read):
    8-byte header length, the JSON header padded to a multiple of 8, then the data."""
    metadata = {"format": "pt"} if metadata is None else metadata
    header: dict[str, Any] = {"__metadata__": metadata} if metadata else {}
    offset = 0
    for key in sorted(tensors):
        t = tensors[key]
        size = nbytes(t)
        header[key] = {
            "dtype": _SAFETENSORS_DTYPES.get(t.dtype, "F32"),
            "shape": list(t.shape),
            "data_offsets": [offset, offset + size],
        }
        offset += size
    text = json.dumps(header, separators=(",", ":"))
    return 8 + math.ceil(len(text.encode()) / 8) * 8 + offset
