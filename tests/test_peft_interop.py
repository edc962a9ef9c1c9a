"""Interoperability with Hugging Face PEFT in both directions: an adapter saved by one library, loaded by the
other into the same base model, gives the same logits (atol 1e-6). Every trainable tensor is randomised
first (B ≠ 0, biases and heads moved), so an ignored or misplaced tensor shows up in the logits."""

from __future__ import annotations

import json

import peft
import pytest
import torch
from peft import PeftModel, get_peft_model

import lorakit
from lorakit import LoraConfig
from support.models import randomize_trainable

CASES = {
    # name: base model, lorakit config, the same adapter as PEFT config
    "llama": (
        "llama_bias",
        LoraConfig(
            r=4,
            alpha=8,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            bias="lora_only",
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
        ),
        dict(
            r=4,
            lora_alpha=8,
            target_modules=["q_proj", "v_proj", "embed_tokens"],
            bias="lora_only",
            rank_pattern={"v_proj": 2},
            alpha_pattern={r"layers\.1\.self_attn\.q_proj": 3},
        ),
    ),
    "llama-rslora": (
        "llama",
        LoraConfig(r=2, alpha=5, target_modules=["k_proj", "o_proj", "gate_proj", "lm_head"], use_rslora=True),
        dict(r=2, lora_alpha=5, target_modules=["k_proj", "o_proj", "gate_proj", "lm_head"], use_rslora=True),
    ),
    "gpt2": (
        "gpt2",
        LoraConfig(r=4, alpha=8, target_modules=["c_attn"]),
        dict(r=4, lora_alpha=8, target_modules=["c_attn"], fan_in_fan_out=True),
    ),
    "gpt2-mlp": (
        "gpt2",
        LoraConfig(r=2, alpha=3, target_modules=["mlp.c_fc", "mlp.c_proj", "wte"]),
        dict(r=2, lora_alpha=3, target_modules=["mlp.c_fc", "mlp.c_proj", "wte"], fan_in_fan_out=True),
    ),
    "bert": (
        "bert",
        LoraConfig(r=2, alpha=4, target_modules=["query", "value"], bias="all", modules_to_save=["classifier"]),
        dict(
            r=2,
            lora_alpha=4,
            target_modules=["query", "value"],
            bias="all",
            modules_to_save=["classifier"],
            task_type="SEQ_CLS",
        ),
    ),
    "convnet": (
        "convnet",
        LoraConfig(r=2, alpha=4, target_modules=["conv1", "conv2", "head"]),
        dict(r=2, lora_alpha=4, target_modules=["conv1", "conv2", "head"]),
    ),
}


def _inputs(base_name, input_ids, images):
    return images if base_name == "convnet" else input_ids


def _logits(model, x) -> torch.Tensor:
    out = model(x)
    return out if isinstance(out, torch.Tensor) else out.logits


@pytest.mark.parametrize("case", CASES)
def test_lorakit_adapter_loads_in_peft(case, base_copy, input_ids, images, tmp_path):
    base_name, config, _ = CASES[case]
    x = _inputs(base_name, input_ids, images)
    model = base_copy(base_name)
    lorakit.add_adapter(model, config)
    randomize_trainable(model)
    expected = _logits(model, x)
    assert not torch.allclose(expected, _logits(base_copy(base_name), x), atol=1e-3)
    lorakit.save_adapter(model, tmp_path)

    peft_model = PeftModel.from_pretrained(base_copy(base_name), tmp_path).eval()
    torch.testing.assert_close(_logits(peft_model, x), expected, rtol=0, atol=1e-6)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit(case, base_copy, input_ids, images, tmp_path):
    base_name, _, peft_kwargs = CASES[case]
    x = _inputs(base_name, input_ids, images)
    peft_model = get_peft_model(base_copy(base_name), peft.LoraConfig(**peft_kwargs))
    randomize_trainable(peft_model)
    peft_model.eval()
    expected = _logits(peft_model, x)
    assert not torch.allclose(expected, _logits(base_copy(base_name), x), atol=1e-3)
    peft_model.save_pretrained(tmp_path)

    model = base_copy(base_name)
    lorakit.load_adapter(model, tmp_path)
    torch.testing.assert_close(_logits(model, x), expected, rtol=0, atol=1e-6)

    # And back: what lorakit saves from it, PEFT reads to the same outputs.
    lorakit.save_adapter(model, tmp_path / "again")
    again = PeftModel.from_pretrained(base_copy(base_name), tmp_path / "again").eval()
    torch.testing.assert_close(_logits(again, x), expected, rtol=0, atol=1e-6)


def test_peft_gaussian_init_and_adapter_name_survive(base_copy, input_ids, tmp_path):
    peft_model = get_peft_model(
        base_copy("llama"),
        peft.LoraConfig(r=2, target_modules=["q_proj"], init_lora_weights="gaussian"),
        adapter_name="mine",
    )
    randomize_trainable(peft_model)
    peft_model.eval()
    peft_model.save_pretrained(tmp_path)
    folder = next(p.parent for p in tmp_path.rglob("adapter_config.json"))
    model = base_copy("llama")
    lorakit.load_adapter(model, folder, name="mine")
    assert lorakit.adapter_config(model, "mine").init == "gaussian"
    torch.testing.assert_close(model(input_ids).logits, peft_model(input_ids).logits, rtol=0, atol=1e-6)


def test_merged_models_agree(base_copy, input_ids, tmp_path):
    """Merging is where GPT-2's transposed Conv1D layout bites: both libraries must fold the same update."""
    model = base_copy("gpt2")
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=["c_attn", "c_proj"]))
    randomize_trainable(model)
    lorakit.save_adapter(model, tmp_path)
    ours = lorakit.merge_and_unload(model)
    theirs = PeftModel.from_pretrained(base_copy("gpt2"), tmp_path).merge_and_unload().eval()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)
    torch.testing.assert_close(ours(input_ids).logits, theirs(input_ids).logits, rtol=0, atol=1e-5)


def test_lorakit_config_is_a_valid_peft_config(llama, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, alpha=3, dropout=0.1, target_modules=["q_proj"], init="gaussian"))
    lorakit.save_adapter(llama, tmp_path)
    config = peft.PeftConfig.from_pretrained(tmp_path)
    assert isinstance(config, peft.LoraConfig)
    assert (config.r, config.lora_alpha, config.lora_dropout) == (2, 3, 0.1)
    assert config.init_lora_weights == "gaussian"
    assert json.loads((tmp_path / "adapter_config.json").read_text())["peft_type"] == "LORA"
