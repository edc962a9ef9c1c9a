"""Method folders: each method's trainable tensors and config in a small folder of its own, loaded onto a fresh
base with identical outputs; files that do not fit (other options, another model, a damaged file) are refused
with a specific error and leave the model as it was."""

from __future__ import annotations

import json

import pytest
import torch
from safetensors.torch import load_file, save_file

from lorakit.methods import (
    CONFIG_NAME,
    WEIGHTS_NAME,
    MethodOptions,
    apply_method,
    load_method,
    method_name,
    read_method,
    save_method,
)
from support.models import randomize_trainable

OPTIONS = MethodOptions(adapter_size=4, prefix_length=3, prompt_length=5)
CASES = [("llama", m) for m in ("full", "adapter", "prefix", "prompt")] + [
    ("bert", m) for m in ("full", "bitfit", "adapter", "prefix", "prompt", "head")
]


def trained(base_copy, key: str, method: str, options: MethodOptions = OPTIONS):
    model = base_copy(key)
    apply_method(model, method, options)
    randomize_trainable(model, std=0.3)
    return model


@pytest.mark.parametrize("key, method", CASES)
@torch.no_grad()
def test_save_and_load_round_trip(base_copy, input_ids, tmp_path, key, method):
    model = trained(base_copy, key, method)
    save_method(model, tmp_path, base_model_name_or_path="tiny", task_type="SEQ_CLS" if key == "bert" else "CAUSAL_LM")
    config = json.loads((tmp_path / CONFIG_NAME).read_text())
    assert config["method"] == method and config["base_model_name_or_path"] == "tiny"
    assert config["options"] == {
        "adapter": {"adapter_size": 4, "adapter_nonlinearity": "gelu", "adapter_norms": False},
        "prefix": {"prefix_length": 3},
        "prompt": {"prompt_length": 5},
    }.get(method, {})
    stored = load_file(tmp_path / WEIGHTS_NAME)
    assert stored.keys() == {n for n, p in model.named_parameters() if p.requires_grad}
    assert not list(tmp_path.glob(".*.tmp"))  # no temporary files left behind

    fresh = base_copy(key)
    load_method(fresh, tmp_path)
    assert method_name(fresh) == method
    for name, param in fresh.named_parameters():
        if param.requires_grad:
            assert torch.equal(param, stored[name]), name
    model.eval(), fresh.eval()
    assert torch.equal(fresh(input_ids).logits, model(input_ids).logits)


def test_full_fine_tuning_saves_every_parameter_once(base_copy, tmp_path):
    model = trained(base_copy, "llama_tied", "full")
    save_method(model, tmp_path)
    stored = load_file(tmp_path / WEIGHTS_NAME)
    # The tied output head shares its tensor with the embeddings: stored once.
    assert stored.keys() == {n for n, _ in model.named_parameters()} and "lm_head.weight" not in stored


def test_a_model_without_a_method_is_not_saved(base_copy, tmp_path):
    with pytest.raises(ValueError, match="no method applied"):
        save_method(base_copy("bert"), tmp_path)
    assert not any(tmp_path.iterdir())


def _damage_options(folder):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["options"]["prefix_length"] = 4
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _damage_method(folder):
    config = json.loads((folder / CONFIG_NAME).read_text())
    config["method"] = "ia3"
    (folder / CONFIG_NAME).write_text(json.dumps(config))


def _damage_key(folder):
    tensors = load_file(folder / WEIGHTS_NAME)
    tensors["bert.encoder.layer.0.attention.self.lorakit_prefix.keys"] = tensors.pop(
        "bert.encoder.layer.0.attention.self.lorakit_prefix.key"
    )
    save_file(tensors, folder / WEIGHTS_NAME)


@pytest.mark.parametrize(
    "damage, error, message",
    [
        (_damage_options, ValueError, r"lorakit_prefix.key has shape \(2, 3, 8\) in the file and \(2, 4, 8\)"),
        (_damage_method, ValueError, "unknown method 'ia3'"),
        (_damage_key, ValueError, "missing bert.encoder.layer.0.attention.self.lorakit_prefix.key; unexpected"),
        (lambda f: (f / WEIGHTS_NAME).write_bytes((f / WEIGHTS_NAME).read_bytes()[:100]), ValueError, "truncated"),
        (lambda f: (f / WEIGHTS_NAME).unlink(), FileNotFoundError, f"has no {WEIGHTS_NAME}"),
        (lambda f: (f / CONFIG_NAME).write_text("{"), ValueError, "not valid JSON"),
        (
            lambda f: (f / CONFIG_NAME).write_text('{"method": "adapter", "options": {"size": 3}}'),
            ValueError,
            "bad options",
        ),
    ],
)
def test_a_folder_that_does_not_fit_is_refused_and_changes_nothing(
    base_copy, tmp_path, unchanged, damage, error, message
):
    save_method(trained(base_copy, "bert", "prefix"), tmp_path)
    damage(tmp_path)
    fresh = base_copy("bert")
    with unchanged(fresh), pytest.raises(error, match=message):
        load_method(fresh, tmp_path)


def test_a_folder_for_another_model_is_refused(base_copy, tmp_path, unchanged):
    save_method(trained(base_copy, "bert", "adapter"), tmp_path)
    other = base_copy("llama")
    with unchanged(other), pytest.raises(ValueError, match="does not fit this model: missing"):
        load_method(other, tmp_path)
    with pytest.raises(FileNotFoundError, match="no method folder"):
        read_method(tmp_path / "absent")
