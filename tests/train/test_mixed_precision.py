"""Mixed-precision training on the CPU with tiny models: a bf16 run of the recipe (bf16 base, float32
trainable tensors, the loss goes down, exact resume, precision fixed on resume), one step's LoRA gradients
under bf16 autocast against a float32 recomputation, fp16's loss scaling (a step with an inf gradient is
skipped and logged), and batches put on the model's device (a model on `meta`: no GPU needed)."""

from __future__ import annotations

import copy
import json
import shutil
from pathlib import Path
from types import SimpleNamespace

import pytest
import torch
import torch.nn.functional as F
from safetensors.torch import load_file
from torch import nn
from transformers import LlamaConfig, LlamaForCausalLM
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.device import autocast, trainable_to_float32
from lorakit.train.checkpoint import STATE_FILE
from lorakit.train.config import RunConfig
from lorakit.train.data import Collator
from lorakit.train.distributed import Parallel
from lorakit.train.loop import LoopSettings, train_adapter
from lorakit.train.loss import causal_lm_loss
from lorakit.train.recipe import TrainingRecipe
from lorakit.train.step import Stepper, build_optimizer
from support.files import random_token_rows, write_pairs

PAIRS = [
    ("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
    ("name[Blue Spice], eatType[pub]", "Blue Spice is a pub."),
] * 12


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    return write_pairs(path, PAIRS)


def run_options(model: Path, data: Path, out: Path, **more) -> dict:
    return dict(
        model=str(model),
        data=str(data),
        input_field="mr",
        target_field="text",
        target_modules=["q_proj", "v_proj"],
        r=2,
        batch_size=4,
        max_steps=6,
        eval_examples=2,
        lr=0.01,
        log_every=1,
        save_every=3,
        progress=False,
        output=str(out),
        **more,
    )


def test_bf16_run_keeps_master_weights_and_resumes(chat_llama_dir, gen_data, tmp_path):
    out = tmp_path / "run"
    cfg = RunConfig(**run_options(chat_llama_dir, gen_data, out, precision="bf16")).resolved()
    recipe = TrainingRecipe(cfg, Parallel(), print)
    recipe.run()
    trainable = {n: p for n, p in recipe.model.named_parameters() if p.requires_grad}
    frozen = [p for p in recipe.model.parameters() if not p.requires_grad]
    assert trainable and all(p.dtype == torch.float32 for p in trainable.values())
    assert frozen and all(p.dtype == torch.bfloat16 for p in frozen)
    losses = [e["loss"] for e in map(json.loads, (out / "metrics.jsonl").read_text().splitlines()) if "loss" in e]
    assert len(losses) == 6 and losses[-1] < losses[0]
    assert "skipped_steps" not in (out / "metrics.jsonl").read_text()  # bf16 needs no loss scaling
    assert (out / "train_config.yaml").read_text().count("precision: bf16") == 1

    # Resume from the step-3 checkpoint, as after a crash: the same weights as the uninterrupted run.
    final = load_file(out / "adapter_model.safetensors")
    assert all(t.dtype == torch.float32 for t in final.values())
    (out / "adapter_model.safetensors").unlink()
    shutil.rmtree(out / "checkpoints" / "step-000006")
    runner = CliRunner()
    args = ["train", "--config", str(_yaml(tmp_path, chat_llama_dir, gen_data, out)), "--precision", "bf16", "--resume"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    resumed = load_file(out / "adapter_model.safetensors")
    for key in final:
        torch.testing.assert_close(resumed[key], final[key], rtol=0, atol=1e-6)
    # The precision must match on resume (the device may differ).
    args = ["train", "--config", str(tmp_path / "run.yaml"), "--precision", "fp32", "--resume", "--device", "cpu"]
    result = runner.invoke(app, args)
    assert result.exit_code == 2 and "different precision" in result.output


def _yaml(tmp_path: Path, chat_llama_dir: Path, gen_data: Path, out: Path) -> Path:
    import yaml

    path = tmp_path / "run.yaml"
    path.write_text(yaml.safe_dump(run_options(chat_llama_dir, gen_data, out)))
    return path


def _tiny_lora_model() -> nn.Module:
    torch.manual_seed(0)
    config = LlamaConfig(
        vocab_size=64,
        hidden_size=32,
        intermediate_size=64,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=64,
    )
    model = LlamaForCausalLM(config)
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, alpha=8, target_modules=["q_proj", "v_proj", "down_proj"]))
    with torch.no_grad():  # B = 0 at initialisation would leave A without gradient
        for name, p in model.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.1)
    return model


def _lora_grads(model: nn.Module, batch: dict) -> dict[str, torch.Tensor]:
    model.zero_grad(set_to_none=True)
    causal_lm_loss(model, batch).backward()
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.requires_grad}


def test_bf16_autocast_gradients_match_float32():
    reference = _tiny_lora_model()
    rows = random_token_rows(6, vocab=64)
    batch = Collator(0)(rows)
    expected = _lora_grads(reference, batch)  # plain float32, no autocast

    mixed = copy.deepcopy(reference).to(torch.bfloat16)
    trainable_to_float32(mixed)
    assert all(p.dtype == torch.float32 for p in mixed.parameters() if p.requires_grad)
    with autocast("cpu", torch.bfloat16):
        got = _lora_grads(mixed, batch)
    assert got.keys() == expected.keys() and len(got) == 12
    for name, grad in got.items():
        assert grad.dtype == torch.float32
        error = (grad - expected[name]).norm() / expected[name].norm()
        assert error < 0.05, (name, float(error))  # bf16 keeps 8 bits of mantissa: ~0.4% per rounding


class TinyLM(nn.Module):
    """Embedding → linear head, with the causal-LM loss; records the device of every tensor it is given."""

    def __init__(self) -> None:
        super().__init__()
        self.embed = nn.Embedding(32, 8)
        self.head = nn.Linear(8, 32)
        self.seen: list[torch.device] = []

    def forward(self, input_ids, attention_mask, labels):
        self.seen += [input_ids.device, attention_mask.device, labels.device]
        logits = self.head(self.embed(input_ids))
        loss = F.cross_entropy(logits[:, :-1].flatten(0, 1), labels[:, 1:].flatten(), ignore_index=-100)
        return SimpleNamespace(loss=loss, logits=logits)


def test_step_puts_batches_on_the_models_device():
    model = TinyLM().to("meta")  # a second device type: every tensor must follow the model there
    optimizer, scheduler = build_optimizer(model, LoopSettings(lr=1e-3, warmup_ratio=0), 2)
    stepper = Stepper(model, random_token_rows(8), Collator(0), Parallel(), 1.0, device=torch.device("meta"))
    stepper.step([[0, 1, 2, 3], [4, 5, 6, 7]], optimizer, scheduler)
    assert model.seen and all(d.type == "meta" for d in model.seen)
    assert isinstance(stepper.window.loss, torch.Tensor) and stepper.window.loss.device.type == "meta"
    assert stepper.window.items == sum(len(r["input_ids"]) - 1 for r in random_token_rows(8))
    assert stepper.window.tokens == sum(len(r["input_ids"]) for r in random_token_rows(8))


def test_fp16_scaler_skips_an_inf_step_and_logs_it():
    torch.manual_seed(0)
    model = TinyLM()
    rows = random_token_rows(8)
    optimizer, scheduler = build_optimizer(model, LoopSettings(lr=1e-2, warmup_ratio=0), 4)
    scaler = torch.amp.GradScaler("cpu", init_scale=2.0**10)
    stepper = Stepper(model, rows, Collator(0), Parallel(), 1.0, dtype=torch.float16, scaler=scaler)
    poison = {"on": True}
    model.head.weight.register_hook(lambda g: g * float("inf") if poison["on"] else g)
    before = copy.deepcopy(model.state_dict())
    stepper.step([[0, 1, 2, 3]], optimizer, scheduler)
    assert all(torch.equal(before[k], v) for k, v in model.state_dict().items())  # skipped: nothing changed
    assert scaler.get_scale() == 2.0**9  # and the scale halved
    entry = stepper.window.close(1, 1e-2, Parallel())
    assert entry["skipped_steps"] == 1 and entry["loss"] > 0
    poison["on"] = False
    stepper.step([[4, 5, 6, 7]], optimizer, scheduler)
    assert not torch.equal(before["head.weight"], model.head.weight)
    assert stepper.window.close(2, 1e-2, Parallel())["skipped_steps"] == 0


def test_fp16_loop_logs_scaling_and_checkpoints_the_scaler(tmp_path):
    torch.manual_seed(0)
    model = _tiny_lora_model()
    settings = LoopSettings(lr=1e-2, batch_size=3, max_steps=4, log_every=2, save_every=2, progress=False)
    train_adapter(model, random_token_rows(12, vocab=64), Collator(0), settings, tmp_path, precision=torch.float16)
    entries = [json.loads(line) for line in (tmp_path / "metrics.jsonl").read_text().splitlines()]
    assert [e["skipped_steps"] for e in entries if "loss" in e] == [0, 0]
    state = torch.load(tmp_path / "checkpoints" / "step-000004" / STATE_FILE, weights_only=False)
    assert state["scaler"]["scale"] == 2.0**16 and "cuda_rng" not in state


def test_fp32_files_hold_no_mixed_precision_state(tmp_path):
    model = _tiny_lora_model()
    settings = LoopSettings(lr=1e-2, batch_size=3, max_steps=2, log_every=1, progress=False)
    train_adapter(model, random_token_rows(6, vocab=64), Collator(0), settings, tmp_path)
    assert "skipped_steps" not in (tmp_path / "metrics.jsonl").read_text()
    state = torch.load(tmp_path / "checkpoints" / "step-000002" / STATE_FILE, weights_only=False)
    assert set(state) == {"step", "optimizer", "scheduler", "torch_rng", "history", "seconds"}


def test_merge_in_float32_saved_in_bf16(chat_llama_dir, tmp_path):
    torch.manual_seed(0)
    model = LlamaForCausalLM.from_pretrained(chat_llama_dir)
    base = model.model.layers[0].self_attn.q_proj.weight.detach().clone()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, alpha=4, target_modules=["q_proj"]))
    layer = model.model.layers[0].self_attn.q_proj
    with torch.no_grad():
        for name, p in layer.named_parameters():
            if "lora_B" in name:
                p.normal_(0, 0.5)
    a, b = [p.detach().clone() for n, p in sorted(layer.named_parameters()) if "lora_" in n]
    lorakit.save_adapter(model, tmp_path / "adapter")
    out = tmp_path / "merged"
    args = ["merge", "--adapter", str(tmp_path / "adapter"), "--model", str(chat_llama_dir), "--output", str(out)]
    result = CliRunner().invoke(app, [*args, "--precision", "bf16", "--device", "cpu"])
    assert result.exit_code == 0, result.output
    saved = load_file(out / "model.safetensors")
    assert {t.dtype for t in saved.values()} == {torch.bfloat16}
    expected = (base.double() + 2.0 * b.double() @ a.double()).to(torch.bfloat16)  # alpha / r = 2
    got = saved["model.layers.0.self_attn.q_proj.weight"]
    assert not torch.equal(got, base.to(torch.bfloat16))  # the update is there
    torch.testing.assert_close(got.float(), expected.float(), rtol=2**-8, atol=0)  # within one bf16 rounding
