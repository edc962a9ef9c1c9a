"""Every registered method, LoRA included, keeps the `FineTuningMethod` contract on a tiny BERT classifier:
applying trains exactly its own parameters (and the new head), saving and loading onto a fresh base gives
the same outputs, `disabled` gives the base model's outputs (against an untouched copy), `remove` gives
every requires_grad flag back, `restore` puts saved values back in place, and only mergeable methods merge."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.methods import (
    METHODS,
    FineTuningMethod,
    MethodOptions,
    apply_method,
    get_method,
    load_trained,
    method_name,
    method_of,
    remove_method,
)
from support.models import assert_same_snapshot, randomize_trainable, snapshot

OPTIONS = MethodOptions(
    adapter_size=4,
    prefix_length=3,
    prompt_length=5,
    lora=lorakit.LoraConfig(r=2, alpha=4, target_modules=["query", "value"]),
)


def added(name: str) -> bool:
    """A parameter the method added beside the base (its own modules, or LoRA's trained head copy)."""
    return any(part in name for part in (".lorakit_", "lorakit_", ".lora_", "modules_to_save"))


def original(name: str) -> str:
    """The base's name of a parameter that a LoRA wrapper moved (`query.base_layer.weight` → `query.weight`)."""
    return name.replace(".base_layer.", ".").replace(".original_module.", ".")


def biases(names: set[str]) -> set[str]:
    return {n for n in names if n.endswith("bias")}


# What each method trains, from the base's parameter names and the names it added; the head trains with
# every method (as a copy of its own under LoRA).
TRAINED = {
    "lora": lambda base, new, head: new,
    "full": lambda base, new, head: base,
    "bitfit": lambda base, new, head: biases(base) | head,
    "adapter": lambda base, new, head: new | head,
    "prefix": lambda base, new, head: new | head,
    "prompt": lambda base, new, head: new | head,
    "head": lambda base, new, head: head,
}


def applied(base_copy, name: str):
    model = base_copy("bert")
    method = get_method(name)
    method.apply(model, OPTIONS)
    return model, method


def logits(model, input_ids) -> torch.Tensor:
    model.eval()
    with torch.no_grad():
        return model(input_ids).logits


def test_the_registry_names_every_method_once_lora_first():
    assert METHODS[0] == "lora" and len(set(METHODS)) == len(METHODS) == len(TRAINED)
    assert set(METHODS) == set(TRAINED)
    with pytest.raises(ValueError, match="unknown method 'ia3'; expected one of: lora, full"):
        get_method("ia3")


@pytest.mark.parametrize("name", METHODS)
def test_apply_trains_only_the_methods_own_parameters(base_copy, name):
    model, method = applied(base_copy, name)
    assert isinstance(method, FineTuningMethod) and method.name == name
    assert method_name(model) == name and method_of(model).name == name
    base = {n for n, _ in base_copy("bert").named_parameters()}
    appeared = {n for n, _ in model.named_parameters() if original(n) not in base}
    new, head = {n for n in appeared if added(n)}, {n for n in base if n.startswith("classifier.")}
    assert appeared == new  # nothing else appeared
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert trainable == TRAINED[name](base, new, head)
    counted = sum(p.numel() for p in {id(p): p for p in model.parameters() if p.requires_grad}.values())
    assert f"{counted:,} trainable" in method.describe(model) and "\n" not in method.describe(model)


@pytest.mark.parametrize("name", METHODS)
def test_save_then_load_onto_a_fresh_base_gives_the_same_outputs(base_copy, input_ids, tmp_path, name):
    model, method = applied(base_copy, name)
    randomize_trainable(model, std=0.3)
    method.save(model, tmp_path, base_model_name_or_path="tiny")
    fresh = base_copy("bert")
    loaded = load_trained(fresh, tmp_path)
    assert loaded.name == name and method_name(fresh) == name
    assert torch.equal(logits(fresh, input_ids), logits(model, input_ids))
    assert not torch.allclose(logits(fresh, input_ids), logits(base_copy("bert"), input_ids))


@pytest.mark.parametrize("name", METHODS)
def test_disabled_gives_the_base_models_outputs(base_copy, input_ids, name):
    model, method = applied(base_copy, name)
    untouched = base_copy("bert")
    generator = torch.Generator().manual_seed(0)
    with torch.no_grad():  # the added parameters only: weights trained in place have nothing to switch off
        for param_name, param in model.named_parameters():
            if added(param_name):
                param.copy_(torch.randn(param.shape, generator=generator) * 0.3)
    if any(added(n) for n, _ in model.named_parameters()):
        assert not torch.allclose(logits(model, input_ids), logits(untouched, input_ids))
    with method.disabled(model):
        assert torch.equal(logits(model, input_ids), logits(untouched, input_ids))
    assert method_name(model) == name  # switched on again


@pytest.mark.parametrize("name", METHODS)
def test_remove_gives_every_requires_grad_flag_back(base_copy, input_ids, name):
    model = base_copy("bert")
    for param in model.bert.embeddings.parameters():  # a base that was partly frozen before
        param.requires_grad_(False)
    flags = {n: p.requires_grad for n, p in model.named_parameters()}
    before = snapshot(model)
    method = get_method(name)
    method.apply(model, OPTIONS)
    method.remove(model)
    assert {n: p.requires_grad for n, p in model.named_parameters()} == flags
    assert_same_snapshot(before, snapshot(model))
    assert method_of(model) is None
    with pytest.raises(ValueError, match="no method to remove"):
        remove_method(model)


@pytest.mark.parametrize("name", METHODS)
def test_restore_puts_the_saved_values_back_in_the_applied_method(base_copy, input_ids, tmp_path, name):
    model, method = applied(base_copy, name)
    randomize_trainable(model, std=0.3)
    saved = logits(model, input_ids)
    method.save(model, tmp_path)
    randomize_trainable(model, std=0.3, seed=9)
    assert not torch.allclose(logits(model, input_ids), saved)
    method.restore(model, tmp_path)
    assert torch.equal(logits(model, input_ids), saved)


@pytest.mark.parametrize("name", METHODS)
def test_only_mergeable_methods_merge_and_merged_equals_unmerged(base_copy, input_ids, name):
    model, method = applied(base_copy, name)
    randomize_trainable(model, std=0.3)
    expected = logits(model, input_ids)
    if not method.mergeable:
        with pytest.raises(ValueError, match="nothing to merge"), method.merged(model):
            pass
        return
    with method.merged(model):
        torch.testing.assert_close(logits(model, input_ids), expected, rtol=1e-5, atol=1e-6)
    assert torch.equal(logits(model, input_ids), expected)


def test_lora_applies_through_apply_method_and_refuses_a_second_method(base_copy, unchanged):
    model = base_copy("bert")
    trainable, total = apply_method(model, "lora", OPTIONS)
    assert (trainable, total) == lorakit.trainable_parameters(model) and lorakit.adapter_names(model) == ["default"]
    assert lorakit.adapter_config(model, "default").modules_to_save == ["classifier"]  # the head trains beside it
    with unchanged(model), pytest.raises(ValueError, match="LoRA adapters"):
        apply_method(model, "adapter", OPTIONS)
    other = base_copy("bert")
    apply_method(other, "prompt", OPTIONS)
    with unchanged(other), pytest.raises(ValueError, match="already has the 'prompt' method"):
        apply_method(other, "lora", OPTIONS)


def test_only_lora_takes_a_quantized_base():
    assert [name for name in METHODS if get_method(name).quantizable_base] == ["lora"]
    assert [name for name in METHODS if get_method(name).mergeable] == ["lora"]
