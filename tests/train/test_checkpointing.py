"""Activation checkpointing in the training loop: the same gradients (dropout masks included) for less
activation memory, the `auto` decision, and the model left as it was."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.estimation.simulate import LiveBytes
from lorakit.train.checkpointing import HEADROOM, disable_checkpointing, enable_checkpointing, wanted
from lorakit.train.loop import LoopSettings, train_adapter
from lorakit.train.loss import causal_lm_loss
from lorakit.train.swiglu import fuse_gated_mlps


def lora_llama(layers: int = 6) -> LlamaForCausalLM:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=layers,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config).double()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, dropout=0.2, target_modules="all-linear"))
    for name, param in model.named_parameters():
        if "lora_B" in name:  # B starts at zero; make the adapter's gradients depend on A's too
            torch.nn.init.normal_(param, std=0.1)
    model.train()
    fuse_gated_mlps(model)
    return model


def step(model: LlamaForCausalLM, batch: dict) -> tuple[dict[str, torch.Tensor], int]:
    """Gradients of the trainable tensors after one loop step from a fixed RNG state, and the activation peak."""
    tracker = LiveBytes([*model.parameters(), *model.buffers()])
    torch.manual_seed(123)
    with tracker:
        causal_lm_loss(model, batch).backward()
    grads = {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}
    model.zero_grad(set_to_none=True)
    return grads, tracker.activation_peak


def test_checkpointing_keeps_gradients_and_cuts_activation_memory():
    model = lora_llama()
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}
    plain, plain_peak = step(model, batch)
    enable_checkpointing(model)
    recomputed, recomputed_peak = step(model, batch)
    assert plain.keys() == recomputed.keys() and len(plain) == 6 * 7 * 2
    for name in plain:  # the same dropout masks in the recomputation: equal to float64 rounding
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-10, atol=1e-12)
    assert recomputed_peak < 0.5 * plain_peak
    disable_checkpointing(model)
    assert not model.model.gradient_checkpointing and model.config.use_cache


@pytest.mark.parametrize(
    "mode,planned,free,expected",
    [
        ("on", None, None, True),
        ("off", 10**12, 1, False),
        ("auto", int(HEADROOM * 1000) + 1, 1000, True),
        ("auto", int(HEADROOM * 1000), 1000, False),
        ("auto", None, 1000, False),  # no plan: off
        ("auto", 10**12, None, False),  # free memory unknown: off
    ],
)
def test_the_decision(mode, planned, free, expected):
    assert wanted(mode, planned, free) is expected


def test_an_unknown_mode_is_refused():
    with pytest.raises(ValueError, match="--grad-checkpointing sometimes: expected one of auto, on, off"):
        wanted("sometimes", None, None)


def test_the_loop_checkpoints_when_the_plan_does_not_fit_and_undoes_it(tmp_path, monkeypatch):
    model = lora_llama(layers=2).float()
    seen: list[bool] = []
    original = causal_lm_loss.__globals__["causal_lm_loss"]

    def recording(model_, batch, label_smoothing=0.0):
        seen.append(bool(model.model.gradient_checkpointing))
        return original(model_, batch, label_smoothing)

    monkeypatch.setattr("lorakit.train.distributed.causal_lm_loss", recording)
    ids = torch.randint(0, 64, (4, 12))
    features = [{"input_ids": row.tolist(), "attention_mask": [1] * 12, "labels": row.tolist()} for row in ids]

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    settings = LoopSettings(max_steps=2, batch_size=2, save_every=None, progress=False)
    train_adapter(model, features, collate, settings, tmp_path / "a", planned_step_bytes=2**62)
    assert seen == [True, True]
    assert not model.model.gradient_checkpointing and model.config.use_cache
    seen.clear()
    train_adapter(model, features, collate, settings, tmp_path / "b", planned_step_bytes=1)
    assert seen == [False, False]


def test_the_plan_is_the_estimate_of_the_step_above_the_weights():
    from lorakit.estimation import estimate
    from lorakit.train.memory_plan import planned_step_bytes

    model = lora_llama(layers=2).float()
    options = dict(r=4, alpha=8, dropout=0.2, target_modules="all-linear", batch_size=2, max_length=48)
    est = estimate(model.config, "lora", dtype="fp32", **options)
    planned = planned_step_bytes(model, "lora", options, "fp32")
    assert planned == est.total_bytes - est.frozen_weight_bytes - est.trainable_weight_bytes > 0
    assert planned_step_bytes(torch.nn.Linear(2, 2), "lora", options, "fp32") is None  # no config: no plan


PAIRS = [("name[The Vaults], eatType[pub]", "The Vaults is a pub."), ("name[Blue Spice]", "Blue Spice.")] * 8


@pytest.mark.parametrize("free_bytes,expected", [(10**15, False), (1000, True)])
def test_lorakit_train_decides_auto_from_the_estimate(chat_llama_dir, tmp_path, monkeypatch, free_bytes, expected):
    """`lorakit train`'s default `auto`: the estimate of the run's step against the free memory (here pretended)."""
    from lorakit.train.config import RunConfig
    from lorakit.train.distributed import Parallel
    from lorakit.train.recipe import TrainingRecipe
    from support.files import write_pairs

    monkeypatch.setattr("lorakit.train.recipe.free_memory_bytes", lambda device: free_bytes)
    decided: list[bool] = []
    original = train_adapter

    def recording(model, features, collate, settings, *args, **kwargs):
        decided.append(settings.grad_checkpointing == "on")
        return original(model, features, collate, settings, *args, **kwargs)

    monkeypatch.setattr("lorakit.train.recipe.train_adapter", recording)
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    options = dict(model=str(chat_llama_dir), data=str(data), input_field="mr", target_field="text")
    options.update(r=2, batch_size=4, max_steps=2, eval_examples=2, save_every=None, progress=False)
    lines: list[str] = []
    cfg = RunConfig(**options, output=str(tmp_path / "run")).resolved()
    TrainingRecipe(cfg, Parallel(), lines.append).run()
    assert decided == [expected]
    assert any(line.startswith("activation checkpointing: on") for line in lines) is expected
    assert "grad_checkpointing: auto" in (tmp_path / "run" / "train_config.yaml").read_text()
