"""Putting adapters into whole models: target matching, freezing and trainable sets, several adapters,
modules_to_save, merge / unmerge / unload / delete, and refusals that leave the model as it was."""

from __future__ import annotations

import copy

import pytest
import torch
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig
from lorakit.layers import LoraLayer
from lorakit.saved_module import TrainableCopy
from support.models import (
    Holder,
    fill_,
    max_relative_error,
    module_types,
    randomize_lora,
    randomize_trainable,
    wrapper_count,
)

LLAMA_LINEARS = [
    "self_attn.q_proj",
    "self_attn.k_proj",
    "self_attn.v_proj",
    "self_attn.o_proj",
    "mlp.gate_proj",
    "mlp.up_proj",
    "mlp.down_proj",
]


def adapted_paths(model: nn.Module) -> list[str]:
    return sorted(p for p, m in model.named_modules() if isinstance(m, LoraLayer))


def trainable_ids(model: nn.Module) -> set[int]:
    return {id(p) for p in model.parameters() if p.requires_grad}


def lora_param_ids(model: nn.Module) -> set[int]:
    return {id(p) for n, p in model.named_parameters() if ".lora_" in f".{n}"}


def layer_paths(*names: str, layers=(0, 1)) -> list[str]:
    """Llama paths, e.g. layer_paths("self_attn.q_proj") -> model.layers.{0,1}.self_attn.q_proj."""
    return sorted(f"model.layers.{i}.{name}" for i in layers for name in names)


# -- adding an adapter ----------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_name", "targets", "inputs"),
    [
        ("llama", ["q_proj", "v_proj", "embed_tokens"], "input_ids"),
        ("gpt2", ["c_attn", "c_fc"], "input_ids"),
        ("bert", ["query", "value", "word_embeddings"], "input_ids"),
        ("convnet", ["conv1", "conv2", "head"], "images"),
    ],
)
def test_model_keeps_its_class_and_its_outputs_at_init(model_name, targets, inputs, base_copy, request):
    model = base_copy(model_name)
    x = request.getfixturevalue(inputs)
    expected = base_copy(model_name)(x)
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=targets))
    assert type(model) is type(base_copy(model_name))
    assert wrapper_count(model) > 0
    out = model(x)
    if model_name != "convnet":
        out, expected = out.logits, expected.logits
    assert torch.equal(out, expected)


def test_every_base_parameter_is_frozen_and_only_lora_trains(llama):
    base_params = {id(p) for p in llama.parameters()}
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert trainable_ids(llama) == lora_param_ids(llama)
    assert not trainable_ids(llama) & base_params
    assert {id(p) for p in llama.parameters()} >= base_params  # the base weights are wrapped, not copied


def test_trainable_count_is_r_times_in_plus_out_per_adapted_matrix(llama):
    total_before = sum(p.numel() for p in llama.parameters())
    lorakit.add_adapter(llama, LoraConfig(r=3, target_modules=["q_proj", "v_proj", "down_proj", "embed_tokens"]))
    hidden, kv, inter, vocab = 16, 8, 32, 64  # v_proj: 1 kv head of dim 8; down_proj: 32 -> 16
    per_layer = 3 * (hidden + hidden) + 3 * (hidden + kv) + 3 * (inter + hidden)
    expected = 2 * per_layer + 3 * (vocab + hidden)
    assert lorakit.trainable_parameters(llama) == (expected, total_before + expected)


def test_tied_parameters_count_once(llama_tied):
    unique = {id(p): p.numel() for p in llama_tied.parameters()}
    assert llama_tied.lm_head.weight is llama_tied.model.embed_tokens.weight
    assert lorakit.trainable_parameters(llama_tied) == (sum(unique.values()), sum(unique.values()))


# -- target matching ------------------------------------------------------------------------------
def test_targets_by_last_name_component(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]))
    assert adapted_paths(llama) == layer_paths("self_attn.q_proj", "self_attn.v_proj")


def test_targets_by_path_suffix(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["self_attn.o_proj", "layers.1.mlp.up_proj"]))
    assert adapted_paths(llama) == sorted(layer_paths("self_attn.o_proj") + ["model.layers.1.mlp.up_proj"])


def test_a_suffix_must_end_at_a_dot(llama, unchanged):
    # "proj" is the end of "q_proj" but not a name component: nothing matches, and that is an error.
    with unchanged(llama), pytest.raises(ValueError, match=r"\['proj'\] match no module"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["proj"]))


def test_targets_by_regex_on_the_full_path(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=r"model\.layers\.1\.self_attn\.(q|k)_proj"))
    assert adapted_paths(llama) == layer_paths("self_attn.k_proj", "self_attn.q_proj", layers=[1])


def test_a_regex_must_match_the_whole_path(llama, unchanged):
    with unchanged(llama), pytest.raises(ValueError, match="match no module"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules="q_proj"))


def test_all_linear_adapts_every_linear_but_the_output_head(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules="all-linear"))
    assert adapted_paths(llama) == layer_paths(*LLAMA_LINEARS)
    assert not isinstance(llama.lm_head, LoraLayer)


def test_all_linear_includes_gpt2_conv1d_but_not_the_head(gpt2):
    conv1d_paths = sorted(p for p, m in gpt2.named_modules() if isinstance(m, Conv1D))
    assert len(conv1d_paths) == 8
    lorakit.add_adapter(gpt2, LoraConfig(r=2, target_modules="all-linear"))
    assert adapted_paths(gpt2) == conv1d_paths
    assert not isinstance(gpt2.lm_head, LoraLayer)


def test_layers_to_transform(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "down_proj"], layers_to_transform=[1]))
    assert adapted_paths(llama) == ["model.layers.1.mlp.down_proj", "model.layers.1.self_attn.q_proj"]


def test_layers_to_transform_with_layers_pattern(llama):
    config = LoraConfig(r=2, target_modules=["v_proj"], layers_to_transform=0, layers_pattern="layers")
    lorakit.add_adapter(llama, config)
    assert adapted_paths(llama) == ["model.layers.0.self_attn.v_proj"]


def test_exclude_modules_by_name_and_regex(llama, base_copy):
    config = LoraConfig(r=2, target_modules="all-linear", exclude_modules=["mlp.down_proj", "k_proj"])
    lorakit.add_adapter(llama, config)
    assert adapted_paths(llama) == layer_paths(
        "self_attn.q_proj", "self_attn.v_proj", "self_attn.o_proj", "mlp.gate_proj", "mlp.up_proj"
    )
    other = base_copy("llama")
    lorakit.add_adapter(other, LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=r".*layers\.0\..*"))
    assert adapted_paths(other) == ["model.layers.1.self_attn.q_proj"]


def test_misspelled_target_is_an_error_listing_the_real_names(llama, unchanged):
    with unchanged(llama), pytest.raises(ValueError) as error:
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_prj"]))
    message = str(error.value)
    assert "v_prj" in message
    for real in ("q_proj", "v_proj", "down_proj", "embed_tokens", "lm_head"):
        assert real in message


@pytest.mark.parametrize(
    "config",
    [
        pytest.param(LoraConfig(r=2, target_modules=["q_proj"], layers_to_transform=[7]), id="no-such-layer"),
        pytest.param(LoraConfig(r=2, target_modules=["q_proj"], exclude_modules=["q_proj"]), id="all-excluded"),
        pytest.param(LoraConfig(r=2, target_modules=r"transformer\.h\.0\.attn\.c_attn"), id="regex-of-another-model"),
    ],
)
def test_targets_left_empty_are_an_error(llama, unchanged, config):
    with unchanged(llama), pytest.raises(ValueError, match="match no module.*adaptable module names are: .*q_proj"):
        lorakit.add_adapter(llama, config)


@pytest.mark.parametrize(("target", "kind"), [("mlp", "LlamaMLP"), ("input_layernorm", "LlamaRMSNorm")])
def test_unsupported_module_type_is_an_error(llama, unchanged, target, kind):
    with unchanged(llama), pytest.raises(TypeError, match=f"is a {kind}; lorakit adapts .*Linear"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", target]))


def test_rank_too_large_for_one_target_changes_nothing(llama, unchanged):
    # r=12 fits q_proj (16→16) but not k_proj (16→8); q_proj must not be wrapped either.
    with unchanged(llama), pytest.raises(ValueError, match=r"r=12 for 'model\.layers\.0\.self_attn\.k_proj'"):
        lorakit.add_adapter(llama, LoraConfig(r=12, target_modules=["q_proj", "k_proj"]))


def test_rank_pattern_too_large_is_refused(llama, unchanged):
    config = LoraConfig(r=2, target_modules=["q_proj", "k_proj"], rank_pattern={"k_proj": 9})
    with unchanged(llama), pytest.raises(ValueError, match="r=9"):
        lorakit.add_adapter(llama, config)


def test_modules_to_save_matching_nothing_is_an_error(bert, unchanged):
    with unchanged(bert), pytest.raises(ValueError, match="'classifer' matches no module.*classifier"):
        lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifer"]))


# -- rank and alpha patterns ----------------------------------------------------------------------
def test_rank_and_alpha_patterns_set_shape_and_scaling(llama):
    config = LoraConfig(
        r=4,
        alpha=8,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"v_proj": 2},
        alpha_pattern={r"layers\.1\.self_attn\.q_proj": 2},
    )
    lorakit.add_adapter(llama, config)
    expected = {  # path: (rank, alpha / rank)
        "model.layers.0.self_attn.q_proj": (4, 2.0),
        "model.layers.1.self_attn.q_proj": (4, 0.5),
        "model.layers.0.self_attn.v_proj": (2, 4.0),
        "model.layers.1.self_attn.v_proj": (2, 4.0),
    }
    x = torch.randn(3, 16, generator=torch.Generator().manual_seed(0))
    for path, (rank, scaling) in expected.items():
        layer = llama.get_submodule(path)
        a = layer.lora_A["default"].weight
        b = fill_(layer.lora_B["default"].weight, 1)
        assert a.shape[0] == rank and b.shape[1] == rank
        # The update the layer really applies, against the expected scaling written out.
        delta = layer(x) - layer.base_layer(x)
        torch.testing.assert_close(delta, scaling * (x @ a.T @ b.T), rtol=1e-5, atol=1e-6)


# -- bias modes -----------------------------------------------------------------------------------
@pytest.mark.parametrize("bias", ["none", "all", "lora_only"])
def test_bias_modes_train_exactly_the_promised_biases(bert, bias):
    base_biases = {n: p for n, p in bert.named_parameters() if n.endswith("bias")}
    target_biases = {id(p) for n, p in base_biases.items() if n.endswith(("query.bias", "value.bias"))}
    assert len(target_biases) == 4
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query", "value"], bias=bias))
    expected = {
        "none": set(),
        "all": {id(p) for p in base_biases.values()},
        "lora_only": target_biases,
    }[bias]
    assert trainable_ids(bert) == lora_param_ids(bert) | expected


def test_bias_all_does_not_train_the_original_of_a_saved_module(bert):
    base_biases = {id(p) for n, p in bert.named_parameters() if n.endswith("bias") and not n.startswith("classifier")}
    original_head = bert.classifier
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"], bias="all", modules_to_save=["classifier"]))
    head_copy = {id(p) for p in bert.classifier.modules_to_save["default"].parameters()}
    assert not any(p.requires_grad for p in original_head.parameters())
    assert trainable_ids(bert) == lora_param_ids(bert) | base_biases | head_copy


def test_all_linear_on_a_model_without_output_embeddings(bert):
    # BERT for classification has no get_output_embeddings(); its head is the modules_to_save entry here.
    linears = sorted(p for p, m in bert.named_modules() if isinstance(m, nn.Linear) and p != "classifier")
    assert len(linears) == 13  # 6 per layer and the pooler
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules="all-linear", modules_to_save=["classifier"]))
    assert adapted_paths(bert) == linears
    assert isinstance(bert.classifier, TrainableCopy)
    assert not any(isinstance(m, LoraLayer) for m in bert.classifier.modules())


# -- modules_to_save ------------------------------------------------------------------------------
def test_modules_to_save_trains_a_copy_and_keeps_the_original(bert, input_ids, base_copy):
    original = bert.classifier
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    assert isinstance(bert.classifier, TrainableCopy)
    head = bert.classifier.modules_to_save["default"]
    assert head is not original and head.weight is not original.weight
    assert torch.equal(head.weight, original.weight)
    assert all(p.requires_grad for p in head.parameters())
    assert not any(p.requires_grad for p in original.parameters())
    assert bert.classifier.out_features == 3  # attribute reads reach the head in use
    assert torch.equal(bert(input_ids).logits, base_copy("bert")(input_ids).logits)


def test_each_adapter_has_its_own_head_and_switching_switches_heads(bert, input_ids, base_copy):
    def constant_head(adapter: str, values: list[float]) -> None:
        head = bert.classifier.modules_to_save[adapter]
        with torch.no_grad():
            head.weight.zero_()
            head.bias.copy_(torch.tensor(values))

    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a")
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["value"], modules_to_save=["classifier"]), "b")
    constant_head("a", [1.0, 2.0, 3.0])
    constant_head("b", [4.0, 5.0, 6.0])
    # A zero-weight head answers its bias whatever the encoder computed: the logits name the head in use.
    lorakit.set_adapter(bert, "a")
    assert torch.equal(bert(input_ids).logits, torch.tensor([[1.0, 2.0, 3.0]] * 2))
    lorakit.set_adapter(bert, "b")
    assert torch.equal(bert(input_ids).logits, torch.tensor([[4.0, 5.0, 6.0]] * 2))
    assert all(p.requires_grad for p in bert.classifier.modules_to_save["b"].parameters())
    assert not any(p.requires_grad for p in bert.classifier.modules_to_save["a"].parameters())
    with lorakit.disable_adapters(bert):
        torch.testing.assert_close(bert(input_ids).logits, base_copy("bert")(input_ids).logits, rtol=0, atol=0)


def test_an_adapter_without_a_copy_uses_the_original_head(bert, input_ids, base_copy):
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]), "a")
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"]), "b")
    with torch.no_grad():
        bert.classifier.modules_to_save["a"].bias.add_(10.0)
    assert torch.equal(bert(input_ids).logits, base_copy("bert")(input_ids).logits)  # b: B = 0, original head


# -- several adapters -----------------------------------------------------------------------------
def test_adapters_are_added_beside_each_other(llama):
    for name in ("a", "b", "c"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), name)
    assert lorakit.adapter_names(llama) == ["a", "b", "c"]
    assert lorakit.active_adapters(llama) == ["c"]
    layer = llama.model.layers[0].self_attn.q_proj
    assert layer.adapter_names == ["a", "b", "c"]
    assert isinstance(layer.base_layer, nn.Linear)  # not a LoRA layer wrapped in another
    assert trainable_ids(llama) == {id(p) for n, p in llama.named_parameters() if ".c." in f"{n}."}


def test_add_without_activating_keeps_the_active_set(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["v_proj"]), "b", activate=False)
    assert lorakit.active_adapters(llama) == ["a"]
    assert all(not p.requires_grad for n, p in llama.named_parameters() if ".b." in f"{n}.")


def test_set_adapter_with_a_list_sums_the_updates():
    torch.manual_seed(0)
    base = nn.Linear(6, 5).double()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    model = Holder(base)
    ranks = {"a": (2, 2.0), "b": (3, 6.0), "c": (1, 4.0)}
    for name, (r, alpha) in ranks.items():
        lorakit.add_adapter(model, LoraConfig(r=r, alpha=alpha, target_modules=["layer"]), name)
    randomize_lora(model)
    x = torch.randn(4, 6, dtype=torch.float64)

    def update(name: str) -> torch.Tensor:
        r, alpha = ranks[name]
        a, b = model.layer.lora_A[name].weight.detach(), model.layer.lora_B[name].weight.detach()
        return (alpha / r) * (x @ a.T @ b.T)

    lorakit.set_adapter(model, ["a", "b"])
    torch.testing.assert_close(model(x), x @ w0.T + b0 + update("a") + update("b"), rtol=0, atol=1e-12)
    layer = model.layer
    assert trainable_ids(model) == {id(getattr(layer, f"lora_{m}")[n].weight) for n in "ab" for m in "AB"}
    lorakit.set_adapter(model, "c")
    torch.testing.assert_close(model(x), x @ w0.T + b0 + update("c"), rtol=0, atol=1e-12)


def test_disable_adapters_gives_the_base_outputs(llama, input_ids, base_copy):
    expected = base_copy("llama")(input_ids).logits
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"]))
    randomize_trainable(llama)
    adapted = llama(input_ids).logits
    assert not torch.allclose(adapted, expected, atol=1e-3)
    with lorakit.disable_adapters(llama):
        assert torch.equal(llama(input_ids).logits, expected)
    assert torch.equal(llama(input_ids).logits, adapted)


def test_disable_adapters_restores_the_adapters_after_an_exception(llama, input_ids):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_lora(llama)
    lorakit.merge(llama)
    adapted = llama(input_ids).logits
    with pytest.raises(ZeroDivisionError), lorakit.disable_adapters(llama):
        _ = 1 / 0
    assert llama.model.layers[0].self_attn.q_proj.merged_adapters == ["default"]
    assert not any(m.disabled for m in llama.modules() if isinstance(m, LoraLayer))
    assert max_relative_error(llama(input_ids).logits, adapted) <= 1e-5


def test_disable_adapters_gives_the_base_outputs_when_merged(llama, input_ids, base_copy):
    expected = base_copy("llama")(input_ids).logits
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["o_proj", "v_proj"]), "b")
    randomize_lora(llama)
    lorakit.set_adapter(llama, ["a", "b"])
    adapted = llama(input_ids).logits
    lorakit.merge(llama)
    with lorakit.disable_adapters(llama):
        assert max_relative_error(llama(input_ids).logits, expected) <= 1e-5
    assert lorakit.inject.merged_names(llama) == ["a", "b"]
    assert max_relative_error(llama(input_ids).logits, adapted) <= 1e-5


# -- merging --------------------------------------------------------------------------------------
def test_merge_with_several_active_adapters_merges_each(llama, input_ids, base_copy):
    base_weights = {k: v.clone() for k, v in base_copy("llama").state_dict().items()}
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=3, alpha=5, target_modules=["v_proj", "gate_proj", "embed_tokens"]), "b")
    randomize_lora(llama)
    lorakit.set_adapter(llama, ["a", "b"])
    unmerged = llama(input_ids).logits
    lorakit.merge(llama)
    v_proj = llama.model.layers[0].self_attn.v_proj
    assert v_proj.merged_adapters == ["a", "b"]
    assert llama.model.embed_tokens.merged_adapters == ["b"]
    assert max_relative_error(llama(input_ids).logits, unmerged) <= 1e-5
    lorakit.unmerge(llama)
    assert max_relative_error(llama(input_ids).logits, unmerged) <= 1e-5
    for path in ("model.layers.0.self_attn.v_proj", "model.embed_tokens"):
        restored = llama.get_submodule(path).base_layer.weight
        torch.testing.assert_close(restored, base_weights[f"{path}.weight"], rtol=0, atol=1e-6)


def test_merged_weight_equals_the_float64_formula(llama):
    w0 = llama.model.layers[1].mlp.down_proj.weight.detach().double().clone()
    lorakit.add_adapter(llama, LoraConfig(r=4, alpha=6, target_modules=["down_proj"]))
    randomize_lora(llama)
    layer = llama.model.layers[1].mlp.down_proj
    a, b = layer.lora_A["default"].weight.detach().double(), layer.lora_B["default"].weight.detach().double()
    lorakit.merge(llama)
    merged = layer.base_layer.weight.detach().double()
    assert max_relative_error(merged, w0 + 1.5 * (b @ a)) <= 1e-6


def test_double_merge_is_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    randomize_lora(llama)
    lorakit.merge(llama)
    with unchanged(llama), pytest.raises(RuntimeError, match="already merged"):
        lorakit.merge(llama)
    with unchanged(llama), pytest.raises(RuntimeError, match="already merged"):
        lorakit.merge(llama, ["default"])


def test_unmerge_without_a_merge_is_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with unchanged(llama), pytest.raises(RuntimeError, match="no adapter is merged"):
        lorakit.unmerge(llama)


def test_merging_an_inactive_adapter_is_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    randomize_lora(llama)
    with unchanged(llama), pytest.raises(RuntimeError, match=r"\['a'\] are not active"):
        lorakit.merge(llama, ["a"])


def test_while_merged_switching_adding_and_loading_are_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    lorakit.merge(llama)
    with unchanged(llama), pytest.raises(RuntimeError, match="unmerge before switching"):
        lorakit.set_adapter(llama, "a")
    with unchanged(llama), pytest.raises(RuntimeError, match="unmerge before adding"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["v_proj"]), "c")
    with unchanged(llama), pytest.raises(RuntimeError, match="unmerge before deleting"):
        lorakit.delete_adapter(llama, "b")


@pytest.mark.parametrize(
    ("model_name", "target", "message"),
    [
        ("llama_tied", "lm_head", "lm_head's weight is tied to .*model.embed_tokens"),
        ("llama_tied", "embed_tokens", "model.embed_tokens's weight is tied to .*lm_head"),
        ("gpt2", "lm_head", "lm_head's weight is tied to .*transformer.wte"),
    ],
)
def test_merge_of_tied_weights_is_refused(model_name, target, message, base_copy, input_ids, unchanged):
    model = base_copy(model_name)
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=[target]))
    randomize_lora(model)
    adapted = model(input_ids).logits  # unmerged use works
    with unchanged(model), pytest.raises(RuntimeError, match=message):
        lorakit.merge(model)
    with unchanged(model), pytest.raises(RuntimeError, match="tied"):
        lorakit.merge_and_unload(model)
    assert torch.equal(model(input_ids).logits, adapted)


def test_merge_of_an_untied_head_is_allowed(llama, input_ids):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["lm_head"]))
    randomize_lora(llama)
    expected = llama(input_ids).logits
    lorakit.merge(llama)
    assert max_relative_error(llama(input_ids).logits, expected) <= 1e-5


# -- names ----------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    "call",
    [
        pytest.param(lambda m: lorakit.set_adapter(m, "nope"), id="set_adapter"),
        pytest.param(lambda m: lorakit.set_adapter(m, ["default", "nope"]), id="set_adapter-list"),
        pytest.param(lambda m: lorakit.delete_adapter(m, "nope"), id="delete_adapter"),
        pytest.param(lambda m: lorakit.merge(m, ["nope"]), id="merge"),
        pytest.param(lambda m: lorakit.adapter_config(m, "nope"), id="adapter_config"),
    ],
)
def test_unknown_adapter_name_is_refused(llama, unchanged, call):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with unchanged(llama), pytest.raises(KeyError, match="no adapter named 'nope'.*default"):
        call(llama)


def test_duplicate_adapter_name_is_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    with unchanged(llama), pytest.raises(ValueError, match="'a' already exists"):
        lorakit.add_adapter(llama, LoraConfig(r=4, target_modules=["v_proj"]), "a")


@pytest.mark.parametrize("name", ["", "a.b", 3])
def test_bad_adapter_name_is_refused(llama, unchanged, name):
    with unchanged(llama), pytest.raises(ValueError, match="adapter name"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), name)


def test_set_adapter_with_no_names_is_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]))
    with unchanged(llama), pytest.raises(ValueError, match="at least one adapter"):
        lorakit.set_adapter(llama, [])


# -- deleting and unloading -----------------------------------------------------------------------
def test_delete_one_of_two_adapters(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "b")
    lorakit.set_adapter(llama, ["a", "b"])
    lorakit.delete_adapter(llama, "b")
    assert lorakit.adapter_names(llama) == lorakit.active_adapters(llama) == ["a"]
    assert adapted_paths(llama) == layer_paths("self_attn.q_proj")  # v_proj lost its only adapter
    assert trainable_ids(llama) == lora_param_ids(llama)
    assert not any(".b." in f"{n}." for n, _ in llama.named_parameters())


def test_deleting_the_only_active_adapter_activates_another(llama):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "b")
    lorakit.delete_adapter(llama, "b")
    assert lorakit.active_adapters(llama) == ["a"]
    assert trainable_ids(llama) == lora_param_ids(llama) != set()


def test_deleting_the_last_adapter_restores_the_original_modules(bert, input_ids, base_copy):
    reference = base_copy("bert")
    config = LoraConfig(r=2, target_modules=["query", "word_embeddings"], modules_to_save=["classifier"])
    lorakit.add_adapter(bert, config)
    randomize_trainable(bert)
    lorakit.delete_adapter(bert, "default")
    assert module_types(bert) == module_types(reference)
    assert bert.state_dict().keys() == reference.state_dict().keys()
    assert lorakit.adapter_names(bert) == []
    assert torch.equal(bert(input_ids).logits, reference(input_ids).logits)


def test_merge_and_unload_returns_a_plain_model_with_equal_outputs(llama, input_ids, base_copy):
    reference = base_copy("llama")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens", "lm_head"]))
    randomize_trainable(llama)
    expected = llama(input_ids).logits
    plain = lorakit.merge_and_unload(llama)
    assert type(plain) is type(reference)
    assert wrapper_count(plain) == 0
    assert module_types(plain) == module_types(reference)
    assert plain.state_dict().keys() == reference.state_dict().keys()
    assert lorakit.adapter_names(plain) == []
    assert max_relative_error(plain(input_ids).logits, expected) <= 1e-5


def test_merge_and_unload_keeps_the_trained_head(bert, input_ids, base_copy):
    reference = base_copy("bert")
    lorakit.add_adapter(bert, LoraConfig(r=2, target_modules=["query"], modules_to_save=["classifier"]))
    randomize_trainable(bert)
    trained_head = bert.classifier.modules_to_save["default"]
    expected = bert(input_ids).logits
    plain = lorakit.merge_and_unload(bert)
    assert plain.classifier is trained_head
    assert module_types(plain) == module_types(reference)
    assert max_relative_error(plain(input_ids).logits, expected) <= 1e-5


def test_merge_and_unload_merges_every_active_adapter_even_after_a_partial_merge(llama, input_ids):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["v_proj"]), "b")
    randomize_lora(llama)
    lorakit.set_adapter(llama, ["a", "b"])
    expected = llama(input_ids).logits
    lorakit.merge(llama, ["a"])
    plain = lorakit.merge_and_unload(llama)
    assert max_relative_error(plain(input_ids).logits, expected) <= 1e-5


def test_merge_and_unload_without_adapters_is_refused(llama, unchanged):
    with unchanged(llama), pytest.raises(RuntimeError, match="no adapters"):
        lorakit.merge_and_unload(llama)


# -- training -------------------------------------------------------------------------------------
@pytest.mark.parametrize(
    ("model_name", "config"),
    [
        ("llama_bias", LoraConfig(r=2, target_modules=["q_proj", "v_proj", "embed_tokens"], bias="lora_only")),
        ("gpt2", LoraConfig(r=2, target_modules=["c_attn"], dropout=0.1)),
        ("bert", LoraConfig(r=2, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"])),
    ],
)
def test_a_training_step_changes_only_trainable_parameters(model_name, config, base_copy, input_ids):
    model = base_copy(model_name)
    lorakit.add_adapter(model, config)
    randomize_trainable(model)  # B ≠ 0 so that A gets gradients too
    before = {n: p.detach().clone() for n, p in model.named_parameters()}
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable

    model.train()
    optimizer = torch.optim.SGD([p for p in model.parameters() if p.requires_grad], lr=0.1)
    if model_name == "bert":
        loss = model(input_ids, labels=torch.tensor([0, 2])).loss
    else:
        loss = model(input_ids, labels=input_ids).loss
    loss.backward()
    optimizer.step()

    for name, param in model.named_parameters():
        if name in trainable:
            assert param.grad is not None, f"{name} got no gradient"
            # Only adapter weights must move: some bias gradients are ~0 by the model's math (attention
            # is blind to a key bias), too small for a step to change the float32 value.
            if "lora_" in name or "modules_to_save" in name:
                assert not torch.equal(param.detach(), before[name]), f"{name} did not train"
        else:
            assert param.grad is None, f"frozen {name} got a gradient"
            assert torch.equal(param.detach(), before[name]), f"frozen {name} changed"


def test_an_adapted_model_can_be_deep_copied(llama, input_ids):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), "a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["v_proj"]), "b")
    randomize_lora(llama)
    clone = copy.deepcopy(llama)
    assert torch.equal(clone(input_ids).logits, llama(input_ids).logits)
    lorakit.set_adapter(clone, "a")
    assert lorakit.active_adapters(llama) == ["b"]  # the copy's adapter state is its own
    assert not torch.equal(clone(input_ids).logits, llama(input_ids).logits)
