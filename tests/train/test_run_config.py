"""RunConfig: one field per option in nested sections; flat and nested YAML read the same; unknown keys and
wrong types are refused in one line; a run saved before an option existed still resumes."""

from __future__ import annotations

import dataclasses

import pytest
import yaml

from lorakit import LoraConfig
from lorakit.methods import MethodOptions
from lorakit.train.config import OPTIONS, SECTION_NAMES, RunConfig, RunError, flatten, leaves
from lorakit.train.loop import LoopSettings


def test_every_option_has_help_and_a_unique_name():
    names = [leaf.field.name for leaf in leaves(RunConfig())]
    assert len(names) == len(set(names)) == len(OPTIONS)
    assert not set(names) & SECTION_NAMES  # a flat key never reads as a section
    assert all(leaf.field.metadata.get("help") for leaf in leaves(RunConfig()))


def test_defaults_come_from_the_library_dataclasses():
    cfg = RunConfig()
    assert cfg.init == LoraConfig.init
    # lorakit train's own rank, alpha and dropout (config.TRAIN_LORA_DEFAULTS), where a LoraConfig follows PEFT
    assert (cfg.r, cfg.alpha, cfg.dropout) == (16, 32.0, 0.05) != (LoraConfig.r, LoraConfig.alpha, LoraConfig.dropout)
    assert (cfg.adapter_size, cfg.prefix_length, cfg.prompt_length) == (
        MethodOptions.adapter_size,
        MethodOptions.prefix_length,
        MethodOptions.prompt_length,
    )
    assert isinstance(cfg.loop, LoopSettings) and cfg.warmup_ratio == LoopSettings.warmup_ratio
    # What `lorakit train` starts from where it differs from the library's own defaults.
    assert (cfg.lr, cfg.eval_every, cfg.dropout) == (2e-3, 50, 0.05)


def test_flat_and_nested_yaml_give_the_same_config(tmp_path):
    flat, nested = tmp_path / "flat.yaml", tmp_path / "nested.yaml"
    flat.write_text(
        yaml.safe_dump(
            {
                "r": 4,
                "lr": 5e-4,
                "data": "sst2",
                "method": "lora",
                "output": "runs/x",
                "target-modules": ["query", "value"],
            }
        )
    )
    nested.write_text(
        yaml.safe_dump(
            {
                "tuning": {"method": "lora", "lora": {"r": 4, "target_modules": ["query", "value"]}},
                "loop": {"lr": 5e-4},
                "dataset": {"data": "sst2"},
                "run": {"output": "runs/x"},
            }
        )
    )
    a, b = RunConfig.from_sources(flat), RunConfig.from_sources(nested)
    assert a == b
    assert (a.r, a.tuning.lora.r, a.lr, a.loop.lr, a.target_modules) == (4, 4, 5e-4, 5e-4, ["query", "value"])
    # Written either way, read back the same.
    assert RunConfig().updated(a.to_dict()) == RunConfig().updated(a.to_dict(nested=True)) == a


def test_overrides_win_over_the_file_and_none_is_not_given(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump({"loop": {"lr": 5e-4, "seed": 3}}))
    cfg = RunConfig.from_sources(path, lr=1e-2, seed=None)
    assert (cfg.lr, cfg.seed) == (1e-2, 3)


@pytest.mark.parametrize(
    "values, message",
    [
        ({"rank": 3}, "unknown option(s) rank"),
        ({"tuning": {"rank": 3, "lora": {"rr": 1}}}, "unknown option(s) tuning.lora.rr, tuning.rank"),
        ({"loop": {"r": 3}}, "unknown option(s) loop.r"),
        ({"lr": "fast"}, "option lr must be a number, got 'fast'"),
        ({"r": 2.5}, "option r must be an integer, got 2.5"),
        ({"resume": "yes"}, "option resume must be true or false"),
        ({"data": None}, "option data needs a value"),
        ({"target_modules": [3]}, "option target_modules must be a list of names or a regex"),
        ({"target_modules": ["q_proj", 3]}, "option target_modules must be a list of names or a regex"),
    ],
)
def test_bad_keys_and_values_are_one_line_errors(values, message):
    with pytest.raises(RunError) as err:
        RunConfig().updated(values)
    assert str(err.value) == message or str(err.value).startswith(message)
    assert "\n" not in str(err.value)


def test_yaml_numbers_that_yaml_reads_as_text_are_numbers(tmp_path):
    path = tmp_path / "run.yaml"
    path.write_text("lr: 1e-3\ntarget_modules: all-linear\n")  # YAML 1.1 wants a dot for a float
    cfg = RunConfig.from_sources(path)
    # A string is a regex or all-linear, as LoraConfig reads it.
    assert (cfg.lr, cfg.target_modules) == (1e-3, "all-linear")


def test_flat_keywords_attributes_and_replace():
    cfg = RunConfig(r=4, data="sst2", lr=0.01)
    assert (cfg.r, cfg.data, cfg.lr, cfg.method) == (4, "sst2", 0.01, "lora")
    assert dataclasses.replace(cfg, r=2).r == 2 and cfg.r == 4  # sections are replaced, never shared and changed
    assert cfg.updated({"alpha": 2.0}).alpha == 2.0 and cfg.alpha == 32.0
    assert not hasattr(cfg, "rank")


def test_resolved_fills_task_model_targets_and_output():
    cfg = RunConfig(data="sst2").resolved()
    assert (cfg.task, cfg.model, cfg.output) == ("seq-cls", "minilm-l6", "runs/sst2-minilm-l6")
    assert cfg.target_modules
    local = RunConfig(model="./my-model", target_modules=None).resolved()  # not a built-in: all-linear, later
    assert (local.task, local.target_modules, local.output) == ("causal-lm", None, "runs/e2e-my-model")
    with pytest.raises(RunError, match="unknown task 'nope'"):
        RunConfig(task="nope").resolved()
    with pytest.raises(RunError, match="unknown --prompt-format 'raw'; expected chat or plain"):
        RunConfig(prompt_format="raw").resolved()


def test_prompt_format_defaults_to_the_data_sets():
    assert (RunConfig().resolved().prompt_format, RunConfig().resolved().template) == ("plain", "{mr}")  # e2e: one task
    assert RunConfig(data="e2e-full").resolved().prompt_format == "plain"
    assert RunConfig(data="sst2").resolved().prompt_format == "chat"
    assert RunConfig(prompt_format="chat").resolved().prompt_format == "chat"


def test_label_smoothing_defaults_to_the_papers_for_causal_lm_only():
    assert RunConfig().resolved().label_smoothing == 0.1  # e2e
    assert RunConfig(data="sst2").resolved().label_smoothing == 0.0
    assert RunConfig(label_smoothing=0.0).resolved().label_smoothing == 0.0
    assert RunConfig(data="sst2", label_smoothing=0.2).resolved().label_smoothing == 0.2
    # A run saved before the option existed trained without it: resuming it needs --label-smoothing 0.
    saved = {k: v for k, v in RunConfig(output="runs/x").resolved().to_dict().items() if k != "label_smoothing"}
    assert RunConfig(output="runs/x").resolved().changed_since(saved) == ["label_smoothing"]
    assert RunConfig(output="runs/x", label_smoothing=0.0).resolved().changed_since(saved) == []


def test_resume_compares_with_the_saved_options_flat_or_nested():
    cfg = RunConfig(r=4, output="runs/x").resolved()
    saved = cfg.to_dict()
    assert cfg.changed_since(saved) == [] and cfg.changed_since(flatten(cfg.to_dict(nested=True))) == []
    assert cfg.changed_since(cfg.to_dict(nested=True)) == []
    # A file written before an option existed: the option had its default then.
    older = {k: v for k, v in saved.items() if k not in ("adapter_nonlinearity", "max_grad_norm")}
    assert cfg.changed_since(older) == []
    assert cfg.updated({"max_grad_norm": 0.5}).changed_since(older) == ["max_grad_norm"]
    # Options that only change how a run is watched may differ.
    assert cfg.updated({"save_every": 7, "progress": False}).changed_since(saved) == []
    assert cfg.updated({"r": 8, "lr": 0.1}).changed_since(saved) == ["lr", "r"]
