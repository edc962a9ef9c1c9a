"""LoRA+ (`loraplus_ratio`): B matrices in their own optimizer group at lr × ratio, everything else at lr;
the first Adam step moves B ratio times further than A; the schedule scales both groups; a run with LoRA+
resumes exactly; the option reaches the loop from RunConfig and the command line."""

from __future__ import annotations

import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import lorakit
from lorakit.train import run as run_module
from lorakit.train.data import Collator
from lorakit.train.loop import LoopSettings, latest_checkpoint, train_adapter
from lorakit.train.optim import fused_adamw_applies, is_lora_b, loraplus_param_groups, param_groups
from lorakit.train.step import build_optimizer
from support.files import interrupting_collator, random_token_rows
from support.models import fill_


def _model(seed: int = 0, **config) -> LlamaForCausalLM:
    torch.manual_seed(seed)
    model = LlamaForCausalLM(
        LlamaConfig(
            vocab_size=32,
            hidden_size=16,
            intermediate_size=32,
            num_hidden_layers=2,
            num_attention_heads=2,
            num_key_value_heads=1,
            max_position_embeddings=64,
        )
    )
    targets = ["q_proj", "v_proj", "embed_tokens"]
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=targets, **config))
    return model


_features = random_token_rows


def test_groups_put_exactly_the_b_matrices_at_the_higher_rate():
    model = _model(use_dora=False)
    groups = loraplus_param_groups(model, lr=1e-3, ratio=16)
    assert [g["lr"] for g in groups] == [1e-3, 16e-3]
    names = {id(p): n for n, p in model.named_parameters()}
    base_group, b_group = ({names[id(p)] for p in g["params"]} for g in groups)
    trainable = {n for n, p in model.named_parameters() if p.requires_grad}
    assert base_group | b_group == trainable and not base_group & b_group
    assert b_group == {n for n in trainable if ".lora_B." in n or ".lora_embedding_B." in n}
    assert all(".lora_A." in n or ".lora_embedding_A." in n for n in base_group)
    assert is_lora_b("model.embed_tokens.lora_embedding_B.default") and not is_lora_b("lm_head.weight")


def test_dora_magnitudes_and_heads_keep_the_base_rate(base_copy):
    model = base_copy("bert")
    lorakit.add_adapter(
        model, lorakit.LoraConfig(r=2, target_modules=["query"], use_dora=True, modules_to_save=["classifier"])
    )
    base_group, b_group = loraplus_param_groups(model, lr=1.0, ratio=4)
    names = {id(p): n for n, p in model.named_parameters()}
    assert all("lora_B" in names[id(p)] for p in b_group["params"])
    assert any("lora_magnitude_vector" in names[id(p)] for p in base_group["params"])
    assert any("classifier" in names[id(p)] for p in base_group["params"])


def test_first_adam_step_moves_b_ratio_times_further_than_a():
    model = _model()
    layer = model.model.layers[0].self_attn.q_proj
    fill_(layer.lora_B["default"].weight, 5, std=0.3)  # B ≠ 0, so A gets a gradient too
    a0, b0 = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    optimizer = torch.optim.AdamW(loraplus_param_groups(model, lr=1e-3, ratio=8), eps=1e-12, weight_decay=0.0)
    batch = Collator(0)(_features(4))
    model(**batch).loss.backward()
    optimizer.step()
    # Adam's first step is lr · g/|g| per entry: |ΔA| = lr and |ΔB| = 8 · lr wherever the gradient is not 0.
    step_a = (layer.lora_A["default"].weight.detach() - a0).abs()
    step_b = (layer.lora_B["default"].weight.detach() - b0).abs()
    torch.testing.assert_close(step_a, torch.full_like(step_a, 1e-3), rtol=1e-3, atol=0)
    torch.testing.assert_close(step_b, torch.full_like(step_b, 8e-3), rtol=1e-3, atol=0)


def test_invalid_ratio_is_refused():
    with pytest.raises(ValueError, match="ratio must be positive"):
        loraplus_param_groups(_model(), lr=1e-3, ratio=0)
    assert len(param_groups(_model(), lr=1e-3)) == 1  # no ratio: one group, as before


SETTINGS = dict(
    lr=0.05, max_steps=6, batch_size=2, grad_accum=2, seed=3, progress=False, save_every=None, loraplus_ratio=16.0
)


def test_training_scales_both_groups_and_resumes_exactly(tmp_path, monkeypatch):
    reference = _model()
    before = {n: p.detach().clone() for n, p in reference.named_parameters() if p.requires_grad}
    rates = []
    original = torch.optim.lr_scheduler.LambdaLR.step

    def spy(self, *args, **kwargs):
        original(self, *args, **kwargs)
        rates.append([g["lr"] for g in self.optimizer.param_groups])

    monkeypatch.setattr(torch.optim.lr_scheduler.LambdaLR, "step", spy)
    train_adapter(reference, _features(), Collator(0), LoopSettings(**SETTINGS), tmp_path / "ref")
    monkeypatch.undo()
    assert len(rates) > SETTINGS["max_steps"] and all(b == pytest.approx(16 * a) for a, b in rates)
    moved = {n: (p.detach() - before[n]).abs().mean().item() for n, p in reference.named_parameters() if n in before}
    assert min(v for n, v in moved.items() if ".lora_B." in n) > max(v for n, v in moved.items() if ".lora_A." in n)

    # Interrupted after 3 steps and resumed: the two optimizer groups come back with their state.
    with pytest.raises(KeyboardInterrupt):
        train_adapter(_model(), _features(), interrupting_collator(0, 7), LoopSettings(**SETTINGS), tmp_path / "run")
    assert latest_checkpoint(tmp_path / "run") is not None
    resumed = _model()
    train_adapter(resumed, _features(), Collator(0), LoopSettings(**SETTINGS), tmp_path / "run", resume=True)
    expected = lorakit.io.adapter_state_dict(reference)
    for key, value in lorakit.io.adapter_state_dict(resumed).items():
        torch.testing.assert_close(value, expected[key], rtol=0, atol=1e-6)


def test_cli_and_run_config_carry_the_variant_options(monkeypatch):
    seen = {}

    def fake_run(cfg, log=print):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_training", fake_run)
    from lorakit.cli import app

    args = ["train", "--data", "sst2", "--loraplus-ratio", "16", "--use-rslora", "--use-dora", "--init", "olora"]
    CliRunner().invoke(app, args)
    cfg = seen["cfg"]
    assert (cfg.loraplus_ratio, cfg.use_rslora, cfg.use_dora, cfg.init) == (16.0, True, True, "olora")
    CliRunner().invoke(app, ["train", "--data", "sst2"])
    cfg = seen["cfg"]
    assert (cfg.loraplus_ratio, cfg.use_rslora, cfg.use_dora, cfg.init) == (None, False, False, "kaiming")


def test_the_loop_takes_the_fused_adamw_whose_steps_are_adamw_written_out():
    """Three steps of the loop's optimizer (fused on the CPU) against AdamW's update in float64:
    m ← β1·m + (1−β1)·g, v ← β2·v + (1−β2)·g², p ← p·(1 − lr·λ) − lr·(m/(1−β1ᵗ)) / (√(v/(1−β2ᵗ)) + ε)."""
    layer = torch.nn.Linear(6, 4)
    settings = LoopSettings(lr=1e-2, weight_decay=0.1, warmup_ratio=0)
    optimizer, scheduler = build_optimizer(layer, settings, total_steps=10)
    assert optimizer.defaults["fused"] is True
    params = [p.detach().double().clone() for p in layer.parameters()]
    moments = [(torch.zeros_like(p), torch.zeros_like(p)) for p in params]
    (beta1, beta2), eps = (0.9, 0.999), 1e-8
    generator = torch.Generator().manual_seed(0)
    for t in range(1, 4):
        lr = scheduler.get_last_lr()[0]
        grads = [torch.randn(p.shape, generator=generator) for p in layer.parameters()]
        for param, grad in zip(layer.parameters(), grads):
            param.grad = grad.clone()
        optimizer.step()
        scheduler.step()
        for i, (grad, (m, v)) in enumerate(zip(grads, moments)):
            g = grad.double()
            m.mul_(beta1).add_((1 - beta1) * g)
            v.mul_(beta2).add_((1 - beta2) * g * g)
            step = (m / (1 - beta1**t)) / ((v / (1 - beta2**t)).sqrt() + eps)
            params[i] = params[i] * (1 - lr * 0.1) - lr * step
        for param, expected in zip(layer.parameters(), params):
            torch.testing.assert_close(param.detach().double(), expected, rtol=1e-5, atol=1e-7)


def test_fused_adamw_applies_to_plain_float_tensors_only():
    assert fused_adamw_applies([torch.zeros(2), torch.zeros(3, dtype=torch.bfloat16)])
    assert not fused_adamw_applies([])
    assert not fused_adamw_applies([torch.zeros(2, dtype=torch.int64)])
    assert not fused_adamw_applies([torch.zeros(2, device="meta")])
