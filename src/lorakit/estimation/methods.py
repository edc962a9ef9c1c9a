"""Fine-tuning methods applied to a model on the meta device: what trains, what is stored, what a batch is.

Every method leaves the meta model in the state training would see (the right parameters trainable,
LoRA layers or adapter modules in place, quantized layers swapped in), so parameter counts are read off
the model itself and the simulated step runs the real forward and backward passes. For sequence
classification the new head (`classifier` / `score`) trains in full with every method, as in `lorakit train`.

* full: every parameter trains.
* lora: `lorakit.add_adapter` with the given `LoraConfig` (exact by construction).
* qlora: `lorakit.quantize` (NF4 with double quantization: 4 + 8/64 + 32/(64·256) ≈ 4.127 bits per weight;
  or int8: 8 bits + an fp32 scale per row) on the frozen linear layers, then LoRA on top.
* adapter: Houlsby bottleneck adapters, two per layer, each x + W_up·σ(W_down·x + b_down) + b_up, i.e.
  2·d·k + k + d parameters. Placed on each block's output (Houlsby places one after attention and one
  after the MLP, inside the residual branch): the same parameters, FLOPs and saved activations.
  Houlsby also trains the layer norms; they are not counted.
* prefix: prefix tuning, a trainable key and value prefix of `prefix_length` positions in every layer:
  layers × 2 × prefix_length × (key/value width: d, or kv_heads × head_dim with grouped-query attention).
  The re-parametrisation MLP used during training in the original paper is not counted. The step is
  simulated with the gradient flowing through every layer (as it must to reach the prefixes); the extra
  prefix keys in attention are not simulated (prefix_length ≪ T).
* prompt: prompt tuning, `prompt_length` trainable embeddings prepended to the input (n × d parameters);
  the simulated batch is T + prompt_length tokens long.
* bitfit: every bias trains (BitFit); models without biases (Llama) have nothing to train.
"""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field

import torch
from torch import nn

from ..config import ALL_LINEAR, LoraConfig

METHODS = ("full", "lora", "qlora", "adapter", "prefix", "prompt", "bitfit")
PEFT_METHODS = tuple(m for m in METHODS if m != "full")
HEAD_NAMES = ("classifier", "score")


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


def text_config(model: nn.Module):
    config = model.config
    return config.get_text_config() if hasattr(config, "get_text_config") else config


def transformer_blocks(model: nn.Module) -> nn.ModuleList:
    """The list of layers: the ModuleList as long as num_hidden_layers holding the most parameters."""
    layers = getattr(text_config(model), "num_hidden_layers", None)
    lists = [m for m in model.modules() if isinstance(m, nn.ModuleList) and len(m) == layers]
    if not lists:
        raise ValueError(f"cannot find the {layers} transformer layers of {type(model).__name__}")
    return max(lists, key=lambda m: sum(p.numel() for p in m.parameters()))


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
    vocab = text_config(model).vocab_size
    tokens = max_length + (settings.prompt_length if method == "prompt" else 0)
    batch = _batch_maker(model, task, batch_size, tokens, vocab,
                         embeds=method in ("prefix", "prompt"),
                         prompt_length=settings.prompt_length if method == "prompt" else 0)

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

    for name in heads:
        for param in getattr(model, name).parameters():
            param.requires_grad_(True)
    if method == "adapter":
        _add_bottleneck_adapters(model, settings.adapter_size)
    elif method == "prefix":
        config = text_config(model)
        heads_kv = getattr(config, "num_key_value_heads", None) or config.num_attention_heads
        head_dim = getattr(config, "head_dim", None) or config.hidden_size // config.num_attention_heads
        model.prefix_kv = nn.Parameter(torch.empty(
            config.num_hidden_layers * 2, settings.prefix_length, heads_kv * head_dim,
            device="meta", dtype=_float_dtype(model)))
        _feed_from(model, model.prefix_kv)
    elif method == "prompt":
        model.prompt_embeddings = nn.Parameter(torch.empty(
            settings.prompt_length, model.get_input_embeddings().embedding_dim, device="meta", dtype=_float_dtype(model)))
        _feed_from(model, model.prompt_embeddings)
    elif method == "bitfit":
        biases = [p for n, p in model.named_parameters() if n.endswith("bias") and not _in_heads(n, heads)]
        if not biases:
            raise ValueError(f"{type(model).__name__} has no bias parameters: BitFit would train nothing")
        for param in biases:
            param.requires_grad_(True)
    saved = {n: p for n, p in _named_unique(model).items() if p.requires_grad}
    return Prepared(model, batch, saved, None, notes)


def houlsby_parameters(layers: int, width: int, size: int, per_layer: int = 2, bias: bool = True) -> int:
    """Parameters of bottleneck adapters: per adapter a d×k down and a k×d up projection (+ k and d biases).
    Houlsby et al. put two per layer; the seeds' count (12 × 64 × 768 × 2 for BERT-base) is one per
    layer without biases."""
    return layers * per_layer * (2 * width * size + ((size + width) if bias else 0))


def _in_heads(name: str, heads: list[str]) -> bool:
    return any(name.startswith(f"{h}.") for h in heads)


def _float_dtype(model: nn.Module) -> torch.dtype:
    return next((p.dtype for p in model.parameters() if p.is_floating_point()), torch.float32)


def _named_unique(model: nn.Module) -> dict[str, nn.Parameter]:
    return dict(model.named_parameters())  # named_parameters lists a tied parameter once


def _peft_key(name: str) -> str:
    """lorakit's file key for a parameter of the default adapter (see lorakit.io.adapter_state_dict)."""
    parts = [p for p in name.split(".") if p not in ("default", "modules_to_save")]
    return "base_model.model." + ".".join(parts)


class _Bottleneck(nn.Module):
    def __init__(self, width: int, size: int, dtype: torch.dtype) -> None:
        super().__init__()
        self.down = nn.Linear(width, size, device="meta", dtype=dtype)
        self.up = nn.Linear(size, width, device="meta", dtype=dtype)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return x + self.up(nn.functional.gelu(self.down(x)))


def _add_bottleneck_adapters(model: nn.Module, size: int) -> None:
    width = text_config(model).hidden_size
    dtype = _float_dtype(model)
    for block in transformer_blocks(model):
        block.lorakit_adapters = nn.ModuleList([_Bottleneck(width, size, dtype) for _ in range(2)])
        block.register_forward_hook(_apply_adapters)


def _apply_adapters(block: nn.Module, args, output):
    hidden = output[0] if isinstance(output, tuple) else output
    for adapter in block.lorakit_adapters:
        hidden = adapter(hidden)
    return (hidden, *output[1:]) if isinstance(output, tuple) else hidden


def _feed_from(model: nn.Module, param: nn.Parameter) -> None:
    """Make the input embeddings depend on `param`, so the backward pass runs through every layer
    and reaches it (prefix and prompt tuning have no trainable weight inside the network)."""
    model._lorakit_soft_input = param


def _batch_maker(model: nn.Module, task: str, batch_size: int, tokens: int, vocab: int, embeds: bool,
                 prompt_length: int) -> Callable[[], dict[str, torch.Tensor]]:
    def make() -> dict[str, torch.Tensor]:
        ids = torch.zeros(batch_size, tokens, dtype=torch.long, device="meta")
        batch = {"attention_mask": torch.ones(batch_size, tokens, dtype=torch.long, device="meta")}
        if task == "causal-lm":
            batch["labels"] = ids
        else:
            batch["labels"] = torch.zeros(batch_size, dtype=torch.long, device="meta")
        if not embeds:
            batch["input_ids"] = ids
            return batch
        soft = model._lorakit_soft_input
        embedded = model.get_input_embeddings()(ids)
        if prompt_length:  # the prompt replaces the first positions' embeddings (same length as PEFT's concat)
            prompt = soft.unsqueeze(0).expand(batch_size, -1, -1)
            embedded = torch.cat([prompt, embedded[:, prompt_length:]], dim=1)
        else:  # prefix: stands in for the per-layer key/value prefixes the gradient must reach
            embedded = embedded + soft.sum() * 0
        batch["inputs_embeds"] = embedded
        return batch

    return make
