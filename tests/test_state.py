"""The adapter state of a model (`lorakit.state`): where it is kept, what it reports, and the modules
that carry adapters."""

from __future__ import annotations

import pytest
from torch import nn

import lorakit
from lorakit.state import (
    adapter_state,
    attach_state,
    detach_state,
    lora_layers,
    require_adapters,
    saved_copies,
)


class Classifier(nn.Module):
    def __init__(self) -> None:
        super().__init__()
        self.body = nn.Sequential(nn.Linear(4, 4), nn.Linear(4, 4))
        self.classifier = nn.Linear(4, 2)


def test_a_plain_model_has_no_state():
    model = Classifier()
    assert adapter_state(model) is None
    assert lorakit.adapter_names(model) == [] and lorakit.active_adapters(model) == []
    assert list(lora_layers(model)) == [] and list(saved_copies(model)) == []


def test_state_is_kept_outside_modules_and_state_dict():
    model = Classifier()
    keys = set(model.state_dict())
    state = attach_state(model)
    assert attach_state(model) is state  # created once
    assert adapter_state(model) is state and set(model.state_dict()) == keys
    detach_state(model)
    assert adapter_state(model) is None


def test_state_after_adding_adapters():
    model = Classifier()
    config = lorakit.LoraConfig(r=1, target_modules=["0"], modules_to_save=["classifier"])
    lorakit.add_adapter(model, config, "a")
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["1"]), "b", activate=False)
    assert lorakit.adapter_names(model) == ["a", "b"] and lorakit.active_adapters(model) == ["a"]
    assert lorakit.adapter_config(model, "b").r == 2
    assert [p for p, _ in lora_layers(model)] == ["body.0", "body.1"]
    assert [p for p, _ in saved_copies(model)] == ["classifier"]
    assert require_adapters(model, ["a", "b"]) is adapter_state(model)


def test_require_adapters_lists_the_known_names():
    model = Classifier()
    with pytest.raises(KeyError, match="adapters on this model: none"):
        require_adapters(model, ["a"])
    lorakit.add_adapter(model, lorakit.LoraConfig(r=1, target_modules=["0"]), "a")
    with pytest.raises(KeyError, match=r"no adapter named 'b'; adapters on this model: \['a'\]"):
        require_adapters(model, ["a", "b"])
    with pytest.raises(KeyError, match="no adapter named 'c'"):
        lorakit.adapter_config(model, "c")
