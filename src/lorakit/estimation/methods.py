"""Fine-tuning methods applied to a model on the meta device: what trains, what is stored, what a batch is.

Every method leaves the meta model in the state training would see (the right parameters trainable,
LoRA layers or adapter modules in place, quantized layers swapped in), so parameter counts are read off
the model itself and the simulated step runs the real forward and backward passes. For sequence
classification the new head (`classifier` / `score`) trains in full with every method, as in `lorakit train`.

* full: every parameter trains.
* lora: `lorakit.add_adapter` with the given `LoraConfig` (exact by construction).
* qlora: `lorakit.quantize` (NF4 with double quantization: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight;
  or int8: 8 bits + an fp32 scale per row) on the frozen linear layers, then LoRA on top.
* adapter, prefix, prompt, bitfit: the real implementations of `lorakit.methods` (as `lorakit train
  --method` applies them), so the simulated step runs their own forward and backward passes. Adapter:
  Houlsby bottlenecks after each layer's attention and MLP output projections, each 2·d·k + k + d
  parameters. Prefix: layers × 2 × prefix_length × (key/value width: d, or kv_heads × head_dim with
  grouped-query attention), the extra keys and values in every attention; no re-parametrisation MLP.
  Prompt: prompt_length × d, the batch grows by prompt_length tokens inside the model. BitFit: every bias
  (models without biases, such as Llama, are refused).
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ALL_LINEAR, LoraConfig
from ..methods import MethodOptions, apply_method
from ..methods.base import HEAD_NAMES, text_config  # noqa: F401  (text_config: lorakit.estimation uses it)

METHODS = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit")
PEFT_METHODS = tuple(m for m in METHODS if m != "full")


@dataclass
class Settings:
    """Method options (the CLI flags)."""

    r: int = 8
    alpha: float = 16.0
    dropout: float = 0.05
    target_modules: list[str] | str | None = None
    quantize: str | None = None
    adapter_size: int = 64
    prefix_length: int = 30
    prompt_length: int = 20


@dataclass
class Prepared:
    model: nn.Module
    make_batch: Callable[[], dict[str, torch.Tensor]]
    saved_tensors: dict[str, nn.Parameter]  # what the method's output file holds, by key
    target_modules: list[str] | str | None = None
    notes: list[str] = field(default_factory=list)


def _heads(model: nn.Module, task: str) -> list[str]:
    return [n for n in HEAD_NAMES if hasattr(model, n)] if task == "seq-cls" else []


def prepare(model: nn.Module, method: str, task: str, settings: Settings, batch_size: int, max_length: int,
            default_targets: list[str] | str | None) -> Prepared:
    """Apply `method` to the meta `model` in place; the batch it trains on and the tensors it saves."""
    if method not in METHODS:
        raise ValueError(f"unknown method {method!r}; expected one of: {', '.join(METHODS)}")
    if settings.quantize and method == "full":
        raise ValueError("full fine-tuning trains every weight, so the weights cannot be quantized "
                         "(use --method qlora, or lora/adapter/prefix/prompt/bitfit with --quantize)")
    quantize = settings.quantize or ("nf4" if method == "qlora" else None)
    notes: list[str] = []
    heads = _heads(model, task)
    batch = _batch_maker(task, batch_size, max_length)  # a soft prompt adds its positions inside the model

    for param in model.parameters():
        param.requires_grad_(method == "full")
    if method == "full":
        return Prepared(model, batch, _named_unique(model), notes=notes)

    if quantize:
        from ..quant import quantize as quantize_model

        report = quantize_model(model, quantize)
        notes.append(report.summary())
    targets = None
    if method in ("lora", "qlora"):
        targets = settings.target_modules or default_targets or ALL_LINEAR
        config = LoraConfig(r=settings.r, alpha=settings.alpha, dropout=settings.dropout,
                            target_modules=targets, modules_to_save=heads or None)
        from ..inject import add_adapter

        try:
            add_adapter(model, config)
        except TypeError as err:  # a target of a layer type LoRA does not support
            raise ValueError(str(err)) from None
        saved = {_peft_key(n): p for n, p in model.named_parameters() if p.requires_grad}
        return Prepared(model, batch, saved, targets, notes)

    apply_method(model, method, MethodOptions(adapter_size=settings.adapter_size, prefix_length=settings.prefix_length,
                                              prompt_length=settings.prompt_length))
    saved = {n: p for n, p in _named_unique(model).items() if p.requires_grad}
    return Prepared(model, batch, saved, None, notes)


def houlsby_parameters(layers: int, width: int, size: int, per_layer: int = 2, bias: bool = True) -> int:
    """Parameters of bottleneck adapters: per adapter a d×k down and a k×d up projection (+ k and d biases).
    Houlsby et al. put two per layer; the seeds' count (12 × 64 × 768 × 2 for BERT-base) is one per
    layer without biases."""
    return layers * per_layer * (2 * width * size + ((size + width) if bias else 0))


def _named_unique(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # named_parameters lists a tied parameter once


def _peft_key(name: str) -> str:
    """lorakit's file key for a parameter of the default adapter (see lorakit.io.adapter_state_dict)."""
    parts = [p for p in name.split(".") if p not in ("default", "modules_to_save")]
    return "base_model.model." + ".".join(parts)


def _batch_maker(task: str, batch_size: int, tokens: int) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, tokens, dtype=torch.long, device="meta")
        labels = ids if task == "causal-lm" else torch.zeros(batch_size, dtype=torch.long, device="meta")
        return {"input_ids": ids, "attention_mask": torch.ones(batch_size, tokens, dtype=torch.long, device="meta"),
                "labels": labels}

    return make
