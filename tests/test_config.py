"""LoraConfig: validation on construction, per-module rank/alpha/scaling, and PEFT json conversion."""

from __future__ import annotations

import json
import math
import warnings

import peft
import pytest

from lorakit import LoraConfig


def test_defaults_are_valid_and_scaling_is_alpha_over_r():
    config = LoraConfig(target_modules=["q_proj"])
    assert (config.r, config.alpha, config.dropout, config.bias, config.init) == (8, 16.0, 0.0, "none", "kaiming")
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 2.0


def test_rslora_scaling_is_alpha_over_sqrt_r():
    config = LoraConfig(r=4, alpha=6, target_modules=["q_proj"], use_rslora=True)
    assert config.scaling_for("q_proj") == pytest.approx(3.0)


@pytest.mark.parametrize(
    ("kwargs", "message"),
    [
        ({"r": 0}, "r must be a positive integer"),
        ({"r": -2}, "r must be a positive integer"),
        ({"r": 2.5}, "r must be a positive integer"),
        ({"r": True}, "r must be a positive integer"),
        ({"alpha": 0}, "alpha must be a positive number"),
        ({"alpha": -1.0}, "alpha must be a positive number"),
        ({"alpha": float("nan")}, "alpha must be a positive number"),
        ({"dropout": 1.0}, r"dropout must be in \[0, 1\)"),
        ({"dropout": -0.1}, r"dropout must be in \[0, 1\)"),
        ({"bias": "some"}, "bias must be one of"),
        ({"init": "orthogonal"}, "init must be one of"),
        ({"target_modules": None}, "target_modules is required"),
        ({"target_modules": []}, "target_modules is required"),
        ({"target_modules": ["q_proj", ""]}, "target_modules must be a list of module names"),
        ({"target_modules": "q_proj("}, "not a valid regular expression"),
        ({"exclude_modules": [3]}, "exclude_modules must be a list"),
        ({"rank_pattern": {"q_proj": 0}}, r"rank_pattern\['q_proj'\] must be a positive integer"),
        ({"rank_pattern": {"q_proj[": 2}}, "not a valid regular expression"),
        ({"alpha_pattern": {"v_proj": -3}}, r"alpha_pattern\['v_proj'\] must be a positive number"),
        ({"layers_to_transform": [0, -1]}, "layers_to_transform must be non-negative integers"),
        ({"modules_to_save": [""]}, "modules_to_save must be a list of module names"),
    ],
)
def test_bad_values_are_refused_on_construction(kwargs, message):
    arguments = {"target_modules": ["q_proj"], **kwargs}
    with pytest.raises(ValueError, match=message):
        LoraConfig(**arguments)


def test_collections_are_normalised():
    config = LoraConfig(target_modules=("v_proj", "q_proj"), modules_to_save=("score",), layers_to_transform=1)
    assert config.target_modules == ["q_proj", "v_proj"]
    assert config.modules_to_save == ["score"]
    assert config.layers_to_transform == [1]


def test_regex_and_all_linear_targets_are_accepted():
    assert LoraConfig(target_modules=r".*\.(q|v)_proj").target_modules == r".*\.(q|v)_proj"
    assert LoraConfig(target_modules="all-linear").target_modules == "all-linear"
    assert LoraConfig(target_modules=["all-linear"]).target_modules == "all-linear"  # as the command line splits it


def test_rank_and_alpha_patterns_match_the_end_of_the_path_at_a_dot():
    config = LoraConfig(
        r=8,
        alpha=16,
        target_modules=["q_proj", "v_proj"],
        rank_pattern={"q_proj": 2, r"layers\.1\.self_attn\.v_proj": 4},
        alpha_pattern={"v_proj": 2},
    )
    assert config.rank_for("model.layers.0.self_attn.q_proj") == 2
    assert config.rank_for("model.layers.0.self_attn.v_proj") == 8
    assert config.rank_for("model.layers.1.self_attn.v_proj") == 4
    # "q_proj" must not match a module that merely ends in the same letters.
    assert config.rank_for("model.layers.0.self_attn.xq_proj") == 8
    assert config.scaling_for("model.layers.0.self_attn.q_proj") == 16 / 2
    assert config.scaling_for("model.layers.0.self_attn.v_proj") == 2 / 8
    assert config.scaling_for("model.layers.1.self_attn.v_proj") == 2 / 4


# -- PEFT json ------------------------------------------------------------------------------------
def test_peft_dict_uses_peft_names():
    config = LoraConfig(r=4, alpha=8, dropout=0.1, target_modules=["c_attn"], bias="lora_only", init="gaussian")
    data = config.to_peft_dict()
    assert data["peft_type"] == "LORA"
    assert (data["r"], data["lora_alpha"], data["lora_dropout"]) == (4, 8, 0.1)
    assert data["target_modules"] == ["c_attn"]
    assert data["bias"] == "lora_only"
    assert data["init_lora_weights"] == "gaussian"
    assert data["use_dora"] is False
    assert "alpha" not in data and "dropout" not in data


def test_peft_dict_round_trip():
    config = LoraConfig(
        r=4,
        alpha=8,
        dropout=0.1,
        target_modules=["q_proj", "v_proj"],
        exclude_modules=["lm_head"],
        layers_to_transform=[1],
        layers_pattern="layers",
        rank_pattern={"q_proj": 2},
        alpha_pattern={"v_proj": 3},
        bias="all",
        modules_to_save=["score"],
        init="gaussian",
        fan_in_fan_out=False,
        use_rslora=True,
        task_type="CAUSAL_LM",
        base_model_name_or_path="tiny",
    )
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        assert LoraConfig.from_peft_dict(config.to_peft_dict()) == config


def test_config_written_by_peft_reads_without_warnings(tmp_path):
    peft_config = peft.LoraConfig(
        r=4,
        lora_alpha=12,
        lora_dropout=0.05,
        target_modules=["q_proj", "v_proj"],
        bias="lora_only",
        rank_pattern={"v_proj": 2},
        alpha_pattern={"q_proj": 3},
        init_lora_weights="gaussian",
        use_rslora=True,
        modules_to_save=["score"],
        task_type="CAUSAL_LM",
    )
    peft_config.save_pretrained(tmp_path)
    data = json.loads((tmp_path / "adapter_config.json").read_text())
    with warnings.catch_warnings():
        warnings.simplefilter("error")
        config = LoraConfig.from_peft_dict(data)
    assert (config.r, config.alpha, config.dropout) == (4, 12, 0.05)
    assert sorted(config.target_modules) == ["q_proj", "v_proj"]
    assert (config.bias, config.init, config.use_rslora) == ("lora_only", "gaussian", True)
    assert config.rank_for("x.v_proj") == 2 and config.alpha_for("x.q_proj") == 3
    assert config.scaling_for("x.q_proj") == pytest.approx(3 / math.sqrt(4))
    assert "score" in config.modules_to_save


def test_config_written_by_lorakit_reads_in_peft():
    data = LoraConfig(r=4, alpha=8, target_modules=["q_proj"], rank_pattern={"q_proj": 2}).to_peft_dict()
    peft_config = peft.LoraConfig.from_peft_type(**data)
    assert (peft_config.r, peft_config.lora_alpha, peft_config.rank_pattern) == (4, 8, {"q_proj": 2})
    assert set(peft_config.target_modules) == {"q_proj"}


def test_unknown_fields_from_a_newer_peft_are_ignored_with_a_warning():
    data = {**LoraConfig(r=2, target_modules=["q_proj"]).to_peft_dict(), "shiny_new_option": 7}
    with pytest.warns(UserWarning, match="shiny_new_option"):
        config = LoraConfig.from_peft_dict(data)
    assert config.r == 2


@pytest.mark.parametrize(
    ("field", "value"),
    [("use_qalora", True), ("lora_bias", True), ("layer_replication", [[0, 1]]), ("target_parameters", ["w"])],
)
def test_peft_options_that_change_the_math_are_refused(field, value):
    data = {**LoraConfig(target_modules=["q_proj"]).to_peft_dict(), field: value}
    with pytest.raises(ValueError, match=field):
        LoraConfig.from_peft_dict(data)


def test_other_peft_methods_are_refused():
    with pytest.raises(ValueError, match="IA3"):
        LoraConfig.from_peft_dict({"peft_type": "IA3", "target_modules": ["k_proj"]})


def test_invalid_values_in_a_peft_dict_are_refused():
    with pytest.raises(ValueError, match="r must be a positive integer"):
        LoraConfig.from_peft_dict({"peft_type": "LORA", "r": 0, "target_modules": ["q_proj"]})
