"""Fine-tuning methods applied to a model on the meta device: what trains, what is stored, what a batch is.

Every method is the real one of `lorakit.methods` (as `lorakit train --method` applies it), so the meta model
is left in the state training would see (the right parameters trainable, LoRA layers or adapter modules in
place, quantized layers swapped in): parameter counts are read off the model itself, and the simulated step
runs the method's own forward and backward passes. For sequence classification the new head (`classifier` /
`score`) trains in full with every method, as in `lorakit train`.

* full: every parameter trains.
* lora: `lorakit.add_adapter` with the given `LoraConfig` (exact by construction).
* qlora: the lora method on a base quantized by `lorakit.quantize` (NF4 with double quantization:
  4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight; or int8: 8 bits + an fp32 scale per row).
* adapter: Houlsby bottlenecks after each layer's attention and MLP output projections, each 2·d·k + k + d
  parameters. prefix: layers × 2 × prefix_length × (key/value width: d, or kv_heads × head_dim with
  grouped-query attention), the extra keys and values in every attention; no re-parametrisation MLP.
  prompt: prompt_length × d, the batch grows by prompt_length tokens inside the model. bitfit: every bias
  (models without biases, such as Llama, are refused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ALL_LINEAR, LoraConfig
from ..methods import METHODS as REGISTERED
from ..methods import FineTuningMethod, MethodOptions, get_method
from ..quant import METHODS as QUANT_METHODS
from ..quant import quantize as quantize_model
from ..state import adapter_config, adapter_names

# What `compare` estimates, in its column order.
METHODS = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit")
# Names that stand for a registered method on a quantized base: (method, default quantization).
QUANTIZED_NAMES = {"qlora": ("lora", "nf4")}


@dataclass
class Prepared:
    method: FineTuningMethod
    make_batch: Callable[[], dict[str, torch.Tensor]]
    saved_tensors: dict[str, torch.Tensor]  # what the method's output file holds, by key
    quantize: str | None = None  # the base's quantization
    target_modules: list[str] | str | None = None  # LoRA's
    notes: list[str] = field(default_factory=list)


def resolve_method(name: str, quantize: str | None) -> tuple[FineTuningMethod, str | None]:
    """The registered method an estimated name stands for, and the base's quantization (checked)."""
    if name not in METHODS:
        raise ValueError(f"unknown method {name!r}; expected one of: {', '.join(METHODS)}")
    registered, implied = QUANTIZED_NAMES.get(name, (name, None))
    method, quantize = get_method(registered), quantize or implied
    if quantize is not None and quantize not in QUANT_METHODS:
        raise ValueError(f"unknown quantization {quantize!r}; expected one of: {', '.join(QUANT_METHODS)}")
    if quantize and not method.quantizable_base:
        takers = [n for n in REGISTERED if get_method(n).quantizable_base]
        raise ValueError(
            f"the {method.name} method does not train on a quantized base (--quantize); {', '.join(takers)} does"
        )
    return method, quantize


def quantizable(name: str) -> bool:
    """Whether the estimated method trains on a quantized base (else `compare` shows it on the float base)."""
    return get_method(QUANTIZED_NAMES.get(name, (name, None))[0]).quantizable_base


def prepare(
    model: nn.Module,
    name: str,
    task: str,
    options: MethodOptions,
    quantize: str | None,
    batch_size: int,
    max_length: int,
) -> Prepared:
    """Apply method `name` to the meta `model` in place: the batch it trains on and the tensors it saves.
    `options.lora` holds the LoRA settings (see `lora_settings`); other methods ignore them."""
    method, quantize = resolve_method(name, quantize)
    notes: list[str] = []
    if quantize:
        notes.append(quantize_model(model, quantize).summary())
    method.apply(model, options)
    targets = adapter_config(model, adapter_names(model)[0]).target_modules if adapter_names(model) else None
    return Prepared(
        method, _batch_maker(task, batch_size, max_length), method.file_tensors(model), quantize, targets, notes
    )


def lora_settings(
    r: int, alpha: float, dropout: float, target_modules: list[str] | str | None, default_targets: list[str] | None
) -> LoraConfig:
    """The adapter of a lora/qlora estimate: the given targets, else the built-in model's, else all-linear."""
    return LoraConfig(r=r, alpha=alpha, dropout=dropout, target_modules=target_modules or default_targets or ALL_LINEAR)


def _batch_maker(task: str, batch_size: int, tokens: int) -> Callable[[], dict[str, torch.Tensor]]:
    """Full-length batches of meta tokens (a soft prompt adds its positions inside the model)."""

    def make() -> dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, tokens, dtype=torch.long, device="meta")
        labels = ids if task == "causal-lm" else torch.zeros(batch_size, dtype=torch.long, device="meta")
        return {
            "input_ids": ids,
            "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long, device="meta"),
            "labels": labels,
        }

    return make
