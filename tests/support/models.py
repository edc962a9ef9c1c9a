"""Helpers shared by the core tests: tiny model builders, parameter randomisers and model snapshots.

Every model is small (hidden 16, 2 layers, vocab 64) and built from a config with a fixed seed.
"""

from __future__ import annotations

from collections.abc import Callable

import torch
from torch import nn
from transformers import (
    BertConfig,
    BertForSequenceClassification,
    GPT2Config,
    GPT2LMHeadModel,
    LlamaConfig,
    LlamaForCausalLM,
)

import lorakit
from lorakit.layers import LoraLayer
from lorakit.saved_module import TrainableCopy

VOCAB = 64
HIDDEN = 16
SEED = 0


# -- tiny models ----------------------------------------------------------------------------------
def _seeded(build: Callable[[], nn.Module]) -> nn.Module:
    torch.manual_seed(SEED)
    return build().eval()


def make_llama(tied: bool = False, attention_bias: bool = False, hidden: int = HIDDEN) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=VOCAB,
        hidden_size=hidden,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        num_key_value_heads=1,
        max_position_embeddings=32,
        tie_word_embeddings=tied,
        attention_bias=attention_bias,
        bos_token_id=0,
        eos_token_id=1,
        pad_token_id=2,
    )
    return _seeded(lambda: LlamaForCausalLM(config))


def make_gpt2() -> GPT2LMHeadModel:
    config = GPT2Config(
        vocab_size=VOCAB,
        n_embd=HIDDEN,
        n_layer=2,
        n_head=2,
        n_positions=32,
        bos_token_id=0,
        eos_token_id=0,
    )
    return _seeded(lambda: GPT2LMHeadModel(config))


def make_bert(num_labels: int = 3) -> BertForSequenceClassification:
    config = BertConfig(
        vocab_size=VOCAB,
        hidden_size=HIDDEN,
        intermediate_size=32,
        num_hidden_layers=2,
        num_attention_heads=2,
        max_position_embeddings=32,
        num_labels=num_labels,
        pad_token_id=0,
    )
    return _seeded(lambda: BertForSequenceClassification(config))


class ConvNet(nn.Module):
    """A small image classifier: a padded convolution, a strided one and a linear head."""

    def __init__(self) -> None:
        super().__init__()
        self.conv1 = nn.Conv2d(3, 8, kernel_size=3, padding=1)
        self.conv2 = nn.Conv2d(8, 8, kernel_size=3, stride=2, padding=1)
        self.head = nn.Linear(8, 5)

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        x = torch.relu(self.conv1(x))
        x = torch.relu(self.conv2(x))
        return self.head(x.mean(dim=(2, 3)))


def make_convnet() -> ConvNet:
    return _seeded(ConvNet)


# -- parameter values -----------------------------------------------------------------------------
def randomize_trainable(model: nn.Module, std: float = 0.1, seed: int = 3) -> None:
    """Give every trainable parameter random values, so B ≠ 0 and adapted outputs really differ."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for _, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if param.requires_grad:
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)


def randomize_lora(model: nn.Module, std: float = 0.1, seed: int = 4) -> None:
    """Random values in every LoRA tensor of every adapter, active or not."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        for name, param in sorted(model.named_parameters(), key=lambda item: item[0]):
            if ".lora_" in f".{name}":
                param.copy_(torch.randn(param.shape, generator=generator, dtype=torch.float64) * std)


# -- structure ------------------------------------------------------------------------------------
def wrapper_count(model: nn.Module) -> int:
    """How many LoRA layers and modules_to_save wrappers the model holds."""
    return sum(isinstance(m, (LoraLayer, TrainableCopy)) for m in model.modules())


def module_types(model: nn.Module) -> list[tuple[str, type]]:
    return [(path, type(module)) for path, module in model.named_modules()]


def snapshot(model: nn.Module) -> dict:
    """Everything a failed call must leave alone: weights, module tree and types, grad flags, adapter state."""
    wrappers = {p: m for p, m in model.named_modules() if isinstance(m, (LoraLayer, TrainableCopy))}
    return {
        "class": type(model),
        "state_dict": {k: v.detach().clone() for k, v in model.state_dict().items()},
        "modules": module_types(model),
        "requires_grad": {n: p.requires_grad for n, p in model.named_parameters()},
        "training": model.training,
        "adapters": lorakit.adapter_names(model),
        "active": lorakit.active_adapters(model),
        "wrapper_state": {
            p: (
                list(getattr(m, "active_adapters", [])),
                list(getattr(m, "merged_adapters", [])),
                dict(getattr(m, "scaling", {})),
                getattr(m, "active_adapter", None),
                m.disabled,
            )
            for p, m in wrappers.items()
        },
    }


def assert_same_snapshot(before: dict, after: dict) -> None:
    assert after["class"] is before["class"]
    assert after["modules"] == before["modules"], "module structure or types changed"
    assert after["requires_grad"] == before["requires_grad"], "requires_grad flags changed"
    assert after["training"] == before["training"]
    assert (after["adapters"], after["active"]) == (before["adapters"], before["active"]), "adapter state changed"
    assert after["wrapper_state"] == before["wrapper_state"], "LoRA layer state changed"
    assert after["state_dict"].keys() == before["state_dict"].keys(), "state_dict keys changed"
    for key, value in before["state_dict"].items():
        assert torch.equal(after["state_dict"][key], value), f"{key} changed"


# -- single layers --------------------------------------------------------------------------------
class Holder(nn.Module):
    """A model made of one layer called `layer`, so a layer can be adapted through the public API."""

    def __init__(self, layer: nn.Module) -> None:
        super().__init__()
        self.layer = layer

    def forward(self, x: torch.Tensor) -> torch.Tensor:
        return self.layer(x)


def adapt_layer(layer: nn.Module, **config) -> Holder:
    """`layer` inside a Holder with one adapter "default" on it (config fields as keyword arguments)."""
    holder = Holder(layer)
    lorakit.add_adapter(holder, lorakit.LoraConfig(target_modules=["layer"], **config))
    return holder


def fill_(tensor: torch.Tensor, seed: int, std: float = 0.5) -> torch.Tensor:
    """Overwrite a parameter in place with seeded random values; returns it."""
    generator = torch.Generator().manual_seed(seed)
    with torch.no_grad():
        tensor.copy_(torch.randn(tensor.shape, generator=generator, dtype=torch.float64) * std)
    return tensor


def max_relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()
