"""`lorakit.adapter_rows`: a batch whose rows use different adapters (or none) gives, row by row, the logits of
that row run alone with only its adapter active, and PEFT's mixed-batch forward (`adapter_names=`) on the same
adapters. Every LoRA tensor is random (B ≠ 0), so a row that got another row's adapter shows in the logits."""

from __future__ import annotations

import pytest
import torch
from peft import PeftModel

import lorakit
from lorakit import LoraConfig
from support.models import randomize_lora
from support.serving import one_torch_thread  # noqa: F401  (an autouse fixture)

ADAPTERS = {
    "a": LoraConfig(r=4, alpha=8, target_modules=["q_proj", "k_proj", "v_proj", "o_proj"]),
    "b": LoraConfig(r=2, alpha=3, target_modules=["q_proj", "v_proj", "gate_proj"]),  # another rank and targets
    "e": LoraConfig(r=2, alpha=4, target_modules=["embed_tokens", "q_proj"]),  # an embedding: run as a group
    "d": LoraConfig(r=3, alpha=6, target_modules=["q_proj", "v_proj"], use_dora=True),  # DoRA: run as a group
}
ROWS = ["a", None, "b", "d", "a", "e", "b"]


@pytest.fixture
def mixed_llama(llama):
    for name, config in ADAPTERS.items():
        lorakit.add_adapter(llama, config, name=name)
    randomize_lora(llama)
    return llama.eval()


@pytest.fixture
def batch() -> torch.Tensor:
    return torch.randint(3, 64, (len(ROWS), 6), generator=torch.Generator().manual_seed(5))


def alone(model, ids: torch.Tensor, name: str | None) -> torch.Tensor:
    """Logits of one row run by itself with only `name` active (None: the base model)."""
    if name is None:
        with lorakit.disable_adapters(model):
            return model(ids[None]).logits[0]
    lorakit.set_adapter(model, name)
    return model(ids[None]).logits[0]


@pytest.mark.parametrize("grad", [False, True], ids=["inference", "grad"])
def test_each_row_equals_its_adapter_alone(mixed_llama, batch, grad):
    with torch.set_grad_enabled(grad):
        with lorakit.adapter_rows(mixed_llama, ROWS):
            mixed = mixed_llama(batch).logits
        expected = torch.stack([alone(mixed_llama, row, name) for row, name in zip(batch, ROWS)])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)
    # Adapters differ enough that a row with a wrong adapter would fail the comparison above.
    assert (expected[0] - alone(mixed_llama, batch[0], "b")).abs().max() > 1e-2


def test_matches_peft_mixed_batch(mixed_llama, base_copy, batch, tmp_path):
    names = ["a", "b", "e"]  # PEFT refuses DoRA adapters in mixed batches
    for name in names:
        lorakit.save_adapter(mixed_llama, tmp_path / name, name=name)
    peft_model = PeftModel.from_pretrained(base_copy("llama"), tmp_path / "a", adapter_name="a")
    for name in names[1:]:
        peft_model.load_adapter(tmp_path / name, adapter_name=name)
    rows = ["a", None, "b", "e", "a", "b", None]
    with torch.no_grad():
        expected = peft_model(batch, adapter_names=[n or "__base__" for n in rows]).logits
        with lorakit.adapter_rows(mixed_llama, rows):
            mixed = mixed_llama(batch).logits
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_base_layer_runs_once_and_plain_adapters_are_gathered(mixed_llama, batch, monkeypatch):
    q_proj = mixed_llama.model.layers[0].self_attn.q_proj
    batch_sizes = []
    q_proj.base_layer.register_forward_hook(lambda module, args, out: batch_sizes.append(args[0].shape[0]))
    per_adapter = []
    original = q_proj.adapter_output
    monkeypatch.setattr(
        q_proj, "adapter_output", lambda name, x, base_out: per_adapter.append(name) or original(name, x, base_out)
    )
    with torch.no_grad(), lorakit.adapter_rows(mixed_llama, ROWS):
        mixed_llama(batch)
    assert batch_sizes == [len(ROWS)]  # the base GEMM once, for the whole batch
    assert per_adapter == ["d"]  # a, b and e (all on q_proj) were gathered; DoRA ran as a group


def test_one_adapter_on_every_row_is_set_adapter(mixed_llama, batch):
    with torch.no_grad():
        with lorakit.adapter_rows(mixed_llama, ["b"] * len(ROWS)):
            mixed = mixed_llama(batch).logits
        lorakit.set_adapter(mixed_llama, "b")
        assert torch.equal(mixed, mixed_llama(batch).logits)


def test_changed_adapters_are_seen(mixed_llama, batch):
    """The stacked copies follow in-place changes and a deleted and re-added adapter of the same name."""
    rows = ["a", "b", "a", "b", None, "a", "b"]
    with torch.no_grad():
        with lorakit.adapter_rows(mixed_llama, rows):
            mixed_llama(batch)  # builds the stacks
        layer = mixed_llama.model.layers[1].self_attn.q_proj
        layer.adapter_tensor("lora_B", "a").mul_(3)
        lorakit.delete_adapter(mixed_llama, "b")
        lorakit.add_adapter(mixed_llama, ADAPTERS["b"], name="b")
        randomize_lora(mixed_llama, seed=9)
        with lorakit.adapter_rows(mixed_llama, rows):
            mixed = mixed_llama(batch).logits
        expected = torch.stack([alone(mixed_llama, row, name) for row, name in zip(batch, rows)])
    torch.testing.assert_close(mixed, expected, atol=1e-5, rtol=0)


def test_bad_rows_are_refused_and_change_nothing(mixed_llama, batch, unchanged):
    with unchanged(mixed_llama), pytest.raises(KeyError, match=r"'zz'.*\['a', 'b', 'e', 'd'\]"):
        with lorakit.adapter_rows(mixed_llama, ["a", "zz"]):
            pass
    with unchanged(mixed_llama), pytest.raises(ValueError, match="one entry per batch row"):
        with lorakit.adapter_rows(mixed_llama, []):
            pass
    with pytest.raises(ValueError, match="3 row adapters but a layer received a batch of 7"):
        with lorakit.adapter_rows(mixed_llama, ["a", "b", None]):
            mixed_llama(batch)
    with lorakit.adapter_rows(mixed_llama, ["a"]), pytest.raises(RuntimeError, match="cannot be nested"):
        with lorakit.adapter_rows(mixed_llama, ["b"]):
            pass
    # After the errors above, nothing is left set on the layers: the model runs its active adapter again.
    lorakit.set_adapter(mixed_llama, "a")
    torch.testing.assert_close(mixed_llama(batch[:1]).logits[0], alone(mixed_llama, batch[0], "a"))


def test_merged_and_shared_module_adapters_are_refused(llama, unchanged):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"]), name="a")
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["v_proj"], modules_to_save=["lm_head"]), name="head")
    with unchanged(llama), pytest.raises(ValueError, match="'head' changes more than its low-rank matrices"):
        with lorakit.adapter_rows(llama, ["a", "head"]):
            pass
    lorakit.set_adapter(llama, "a")
    lorakit.merge(llama)
    with unchanged(llama), pytest.raises(RuntimeError, match=r"\['a'\] are merged"):
        with lorakit.adapter_rows(llama, ["a", None]):
            pass
