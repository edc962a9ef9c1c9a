"""The rules that name modules (`lorakit.targets`), against expectations written out by hand: suffix lists
versus regular expressions versus "all-linear", layer indices, the output head, classification heads,
and tied weights."""

from __future__ import annotations

import pytest
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.layers import LoraLayer
from lorakit.quant import QuantLinear
from lorakit.targets import (
    HEAD_NAMES,
    head_names,
    layer_index,
    name_matches,
    output_head,
    own_weight,
    weight_owners,
)


class TinyLM(nn.Module):
    """Two numbered blocks of a Linear, a GPT-2 Conv1D and a Conv2d, an embedding and an output head."""

    def __init__(self, tied: bool = False) -> None:
        super().__init__()
        self.embed = nn.Embedding(10, 4)
        self.blocks = nn.ModuleList(
            nn.ModuleDict({"proj": nn.Linear(4, 4), "c_attn": Conv1D(8, 4), "conv": nn.Conv2d(1, 1, 1)})
            for _ in range(2)
        )
        self.lm_head = nn.Linear(4, 10, bias=False)
        if tied:
            self.lm_head.weight = self.embed.weight

    def get_output_embeddings(self) -> nn.Module:
        return self.lm_head


# -- suffix lists and regular expressions ---------------------------------------------------------
@pytest.mark.parametrize(
    ("spec", "path", "expected"),
    [
        (["q_proj"], "q_proj", True),
        (["q_proj"], "layers.0.attn.q_proj", True),
        (["q_proj"], "layers.0.attn.xq_proj", False),  # a suffix of the name, not a path component
        (["q_proj"], "layers.0.attn.q_proj.base_layer", False),
        (["attn.q_proj"], "layers.0.attn.q_proj", True),  # several components at the end of the path
        (["attn.q_proj"], "layers.0.self_attn.q_proj", False),
        (["k_proj", "v_proj"], "layers.1.attn.v_proj", True),
        ([], "layers.0.attn.q_proj", False),
        ("q_proj", "layers.0.attn.q_proj", False),  # a string is a regex over the whole path
        (r".*\.q_proj", "layers.0.attn.q_proj", True),
        (r"layers\.0\..*_proj", "layers.0.attn.v_proj", True),
        (r"layers\.0\..*_proj", "layers.10.attn.v_proj", False),
        (r"layers\.[01]\.attn\.(q|v)_proj", "layers.1.attn.k_proj", False),
    ],
)
def test_name_matches(spec, path, expected):
    assert name_matches(spec, path) is expected


def adapted(model: nn.Module) -> list[str]:
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


def test_suffix_regex_and_all_linear_pick_different_modules():
    by_suffix = lorakit.add_adapter(TinyLM(), lorakit.LoraConfig(r=1, target_modules=["proj"]))
    assert adapted(by_suffix) == ["blocks.0.proj", "blocks.1.proj"]
    by_regex = lorakit.add_adapter(TinyLM(), lorakit.LoraConfig(r=1, target_modules=r"blocks\.1\..*"))
    assert adapted(by_regex) == ["blocks.1.c_attn", "blocks.1.conv", "blocks.1.proj"]
    # Linear and Conv1D layers, never the output head, the embedding or a convolution.
    all_linear = lorakit.add_adapter(TinyLM(), lorakit.LoraConfig(r=1, target_modules="all-linear"))
    assert adapted(all_linear) == ["blocks.0.c_attn", "blocks.0.proj", "blocks.1.c_attn", "blocks.1.proj"]


def test_layers_to_transform_uses_the_layer_index():
    config = lorakit.LoraConfig(r=1, target_modules=["proj"], layers_to_transform=[1], layers_pattern="blocks")
    assert adapted(lorakit.add_adapter(TinyLM(), config)) == ["blocks.1.proj"]


# -- layer index ----------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("path", "pattern", "expected"),
    [
        ("model.layers.3.mlp.up_proj", None, 3),
        ("model.layers.3.mlp.up_proj", "layers", 3),
        ("model.layers.3.mlp.up_proj", ["h", "layers"], 3),
        ("transformer.h.11.attn.c_attn", "h", 11),
        ("transformer.h.11.attn.c_attn", "layers", None),
        ("blocks.2.layers.5.proj", None, 2),  # without a pattern: the first numbered component
        ("blocks.2.layers.5.proj", "layers", 5),
        ("model.layers.7", None, 7),
        ("model.layers.12x.proj", None, None),  # the number must be a whole component
        ("xlayers.4.proj", "layers", None),  # and the pattern a whole component too
        ("lm_head", None, None),
    ],
)
def test_layer_index(path, pattern, expected):
    assert layer_index(path, pattern) == expected


# -- heads and tied weights -----------------------------------------------------------------------
def test_output_head():
    model = TinyLM()
    assert output_head(model) is model.lm_head
    assert output_head(nn.Linear(2, 2)) is None  # no get_output_embeddings at all

    class Headless(nn.Module):
        def get_output_embeddings(self):
            raise NotImplementedError

    assert output_head(Headless()) is None


def test_head_names():
    assert HEAD_NAMES == ("classifier", "score")
    model = nn.Module()
    assert head_names(model) == []
    model.score = nn.Linear(2, 2)
    model.classifier = nn.Linear(2, 2)
    assert head_names(model) == ["classifier", "score"]  # in HEAD_NAMES' order
    other = nn.Module()
    other.score = 0.5  # an attribute that is no module is no head
    assert head_names(other) == []


def test_weight_owners_and_own_weight():
    untied = TinyLM()
    owners = weight_owners(untied)
    assert owners[id(untied.lm_head.weight)] == ["lm_head"]
    assert owners[id(untied.blocks[1]["proj"].weight)] == ["blocks.1.proj"]
    tied = TinyLM(tied=True)
    assert weight_owners(tied)[id(tied.embed.weight)] == ["embed", "lm_head"]
    assert own_weight(tied.lm_head) is tied.embed.weight
    assert own_weight(tied.blocks[0]) is None  # only a submodule has a weight
    assert own_weight(QuantLinear.from_linear(nn.Linear(64, 2), "int8")) is None  # its weight is decoded, not held
