"""Activation checkpointing in the training loop: the same gradients (dropout masks included) for less
activation memory, of every block or the first few, the `auto` choice of how many, and the model left as it
was."""

from __future__ import annotations

import dataclasses

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.estimation.simulate import LiveBytes
from lorakit.train.checkpointing import (
    HEADROOM,
    blocks_to_checkpoint,
    checkpointable_blocks,
    disable_checkpointing,
    enable_checkpointing,
    memory_budget,
)
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


def token_batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(0, 64, (2, 48), generator=torch.Generator().manual_seed(1))
    return {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids}


def test_checkpointing_keeps_gradients_and_cuts_activation_memory():
    model, batch = lora_llama(), token_batch()
    plain, plain_peak = step(model, batch)
    enable_checkpointing(model)
    recomputed, recomputed_peak = step(model, batch)
    assert plain.keys() == recomputed.keys() and len(plain) == 6 * 7 * 2
    for name in plain:  # the same dropout masks in the recomputation: equal to float64 rounding
        torch.testing.assert_close(recomputed[name], plain[name], rtol=1e-10, atol=1e-12)
    assert recomputed_peak < 0.5 * plain_peak
    disable_checkpointing(model)
    assert not model.model.gradient_checkpointing and model.config.use_cache


def test_checkpointing_the_first_blocks_keeps_gradients_and_saves_memory_between_none_and_all():
    model, batch = lora_llama(), token_batch()
    plain, plain_peak = step(model, batch)
    enable_checkpointing(model)
    _, all_peak = step(model, batch)
    disable_checkpointing(model)
    enable_checkpointing(model, blocks=3)
    assert [block.gradient_checkpointing for block in checkpointable_blocks(model)] == [True] * 3 + [False] * 3
    partial, partial_peak = step(model, batch)
    for name in plain:
        torch.testing.assert_close(partial[name], plain[name], rtol=1e-10, atol=1e-12)
    assert all_peak < partial_peak < plain_peak
    disable_checkpointing(model)
    assert not any(block.gradient_checkpointing for block in checkpointable_blocks(model))
    with pytest.raises(ValueError, match="cannot checkpoint 7 blocks: the model has 6"):
        enable_checkpointing(model, blocks=7)
    assert not any(block.gradient_checkpointing for block in checkpointable_blocks(model))


def linear_plan(without: int, per_block: int, calls: list[int]):
    """A step of `without` bytes that each checkpointed block shrinks by `per_block`, recording what is asked."""

    def plan(blocks: int) -> int:
        calls.append(blocks)
        return without - per_block * blocks

    return plan


@pytest.mark.parametrize(
    "mode,budget,expected",
    [
        ("on", None, 30),
        ("off", 1, 0),
        ("12", None, 12),
        ("0", 1, 0),
        ("auto", 10_000, 0),  # the step fits without
        ("auto", 9_999, 1),
        ("auto", 7_001, 10),  # 10,000 − 300·10 = 7,000 fits, 7,300 does not
        ("auto", 7_000, 10),
        ("auto", 1_000, 30),  # 1,000 fits only with all 30
        ("auto", 999, 30),  # nothing fits: every block, the least memory there is
        ("auto", None, 0),  # free memory unknown: off
    ],
)
def test_how_many_blocks(mode, budget, expected):
    calls: list[int] = []
    assert blocks_to_checkpoint(mode, 30, linear_plan(10_000, 300, calls), budget) == expected
    assert len(calls) <= 7  # a bisection: about log2(30) + 2 estimates, not one per block


def test_auto_without_a_plan_is_off_and_bad_values_are_refused():
    assert blocks_to_checkpoint("auto", 30, None, 10**9) == 0
    assert blocks_to_checkpoint("auto", 30, lambda blocks: None, 1) == 0  # the step cannot be estimated
    with pytest.raises(ValueError, match="--grad-checkpointing sometimes: expected one of auto, on, off or a number"):
        blocks_to_checkpoint("sometimes", 30, None, None)
    with pytest.raises(ValueError, match="--grad-checkpointing 31: the model has 30 blocks"):
        blocks_to_checkpoint("31", 30, None, None)
    with pytest.raises(ValueError, match="--grad-checkpointing -1"):
        LoopSettings(grad_checkpointing="-1")
    with pytest.raises(ValueError, match="--memory-limit must be a positive number of GB"):
        LoopSettings(memory_limit=0.0)


def test_the_budget_is_the_limit_or_a_share_of_the_free_memory(monkeypatch):
    monkeypatch.setattr("lorakit.train.checkpointing.free_memory_bytes", lambda device: 1000)
    assert memory_budget(None, torch.device("cpu")) == int(HEADROOM * 1000)
    assert memory_budget(2_500_000_000, torch.device("cpu")) == 2_500_000_000
    assert LoopSettings(memory_limit=2.5).memory_limit_bytes == 2_500_000_000
    monkeypatch.setattr("lorakit.train.checkpointing.free_memory_bytes", lambda device: None)
    assert memory_budget(None, torch.device("cpu")) is None


def test_auto_picks_the_fewest_blocks_whose_estimated_step_fits():
    """With `lorakit estimate`'s real figures for a small Llama: the plan shrinks block by block (but for the
    last: recomputed first in the backward pass, at the peak, it saves nothing), and the choice is the first
    count under a budget half-way between none and all."""
    from lorakit.train.memory_plan import step_plan

    model = lora_llama(layers=6).float()
    options = dict(r=4, alpha=8, dropout=0.2, target_modules="all-linear", batch_size=4, max_length=256)
    plan = step_plan(model, "lora", options, "fp32")
    figures = [plan(blocks) for blocks in range(7)]
    assert all(later < earlier for earlier, later in zip(figures[:-1], figures[1:-1]))
    assert figures[6] == figures[5]
    budget = (figures[0] + figures[6]) // 2
    chosen = blocks_to_checkpoint("auto", 6, plan, budget)
    assert 0 < chosen < 6 and figures[chosen] <= budget < figures[chosen - 1]


def test_the_loop_checkpoints_when_the_plan_does_not_fit_and_undoes_it(tmp_path, monkeypatch):
    model = lora_llama(layers=2).float()
    seen: list[bool] = []
    original = causal_lm_loss.__globals__["causal_lm_loss"]

    def recording(model_, batch, label_smoothing=0.0):
        seen.append(sum(block.gradient_checkpointing for block in checkpointable_blocks(model)))
        return original(model_, batch, label_smoothing)

    monkeypatch.setattr("lorakit.train.distributed.causal_lm_loss", recording)
    ids = torch.randint(0, 64, (4, 12))
    features = [{"input_ids": row.tolist(), "attention_mask": [1] * 12, "labels": row.tolist()} for row in ids]

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    settings = LoopSettings(max_steps=2, batch_size=2, save_every=None, progress=False)
    result = train_adapter(model, features, collate, settings, tmp_path / "a", step_plan=lambda blocks: 2**62)
    assert seen == [2, 2] and result.checkpointed_blocks == 2
    assert not model.model.gradient_checkpointing and model.config.use_cache
    seen.clear()
    train_adapter(model, features, collate, settings, tmp_path / "b", step_plan=lambda blocks: 1)
    assert seen == [0, 0]
    seen.clear()
    limited = LoopSettings(max_steps=1, batch_size=2, save_every=None, progress=False, memory_limit=1e-6)
    train_adapter(model, features, collate, limited, tmp_path / "c", step_plan=lambda blocks: 1500 - 500 * blocks)
    assert seen == [1]  # 1,000 bytes fit the 1,000-byte limit with one block checkpointed


def test_every_process_checkpoints_the_most_blocks_any_process_needs(tmp_path, monkeypatch):
    """Under several processes "auto" is agreed on inside the loop (library callers included): another process
    whose memory needs both blocks makes this one, whose plan fits without, checkpoint both too."""
    from lorakit.train.distributed import Parallel

    class AnotherNeedsTwo(Parallel):
        def gather(self, items):
            return [*items, 2]

    model = lora_llama(layers=2).float()
    ids = torch.randint(0, 64, (2, 12))
    features = [{"input_ids": row.tolist(), "attention_mask": [1] * 12, "labels": row.tolist()} for row in ids]

    def collate(rows):
        return {k: torch.tensor([r[k] for r in rows]) for k in rows[0]}

    settings = LoopSettings(max_steps=1, batch_size=2, save_every=None, progress=False)
    fits = lambda blocks: 1  # noqa: E731  (the step fits without checkpointing)

    def blocks(settings: LoopSettings, name: str, parallel: Parallel | None = None) -> int:
        result = train_adapter(model, features, collate, settings, tmp_path / name, parallel=parallel, step_plan=fits)
        return result.checkpointed_blocks

    assert blocks(settings, "alone") == 0 and blocks(settings, "two", AnotherNeedsTwo()) == 2
    fixed = dataclasses.replace(settings, grad_checkpointing="1")  # a number is the same on every process already
    assert blocks(fixed, "one", AnotherNeedsTwo()) == 1


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


@pytest.mark.parametrize("free_bytes,expected", [(10**15, 0), (1000, 2)])
def test_lorakit_train_decides_auto_from_the_estimate(chat_llama_dir, tmp_path, monkeypatch, free_bytes, expected):
    """`lorakit train`'s default `auto`: the estimate of the run's step against the free memory (here pretended);
    the two-block model checkpoints none or both, says so, and records it."""
    from lorakit.train.config import RunConfig
    from lorakit.train.distributed import Parallel
    from lorakit.train.recipe import TrainingRecipe
    from support.files import write_pairs

    monkeypatch.setattr("lorakit.train.checkpointing.free_memory_bytes", lambda device: free_bytes)
    decided: list[str] = []
    original = train_adapter

    def recording(model, features, collate, settings, *args, **kwargs):
        decided.append(settings.grad_checkpointing)
        return original(model, features, collate, settings, *args, **kwargs)

    monkeypatch.setattr("lorakit.train.recipe.train_adapter", recording)
    data = write_pairs(tmp_path / "pairs.jsonl", PAIRS)
    options = dict(model=str(chat_llama_dir), data=str(data), input_field="mr", target_field="text")
    options.update(r=2, batch_size=4, max_steps=2, eval_examples=2, save_every=None, progress=False)
    lines: list[str] = []
    cfg = RunConfig(**options, output=str(tmp_path / "run")).resolved()
    results = TrainingRecipe(cfg, Parallel(), lines.append).run()
    assert decided == [str(expected)] and results["train"]["checkpointed_blocks"] == expected
    assert any(line.startswith("activation checkpointing: 2 of 2 blocks") for line in lines) is bool(expected)
    assert "grad_checkpointing: auto" in (tmp_path / "run" / "train_config.yaml").read_text()
