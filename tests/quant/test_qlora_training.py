"""Training LoRA on a quantized base (QLoRA): gradients equal those of a float model holding the decoded
weights, training survives eval passes and `generate` under no_grad (bitsandbytes on CPU silently stops
back-propagating after one), `lorakit train --quantize`, and the measured weight memory of SmolLM2-135M."""

from __future__ import annotations

import json

import pytest
import torch
import yaml
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.quant import QuantLinear, quantize, quantized_layers
from support.files import save_tiny_llama
from support.models import make_llama, randomize_lora

HIDDEN = 36  # q/o 36×36 and k/v 18×36 are not whole numbers of 64-value blocks: padded
LORA = dict(r=4, alpha=8, dropout=0.0, target_modules="all-linear")


def _batch() -> dict[str, torch.Tensor]:
    ids = torch.randint(3, 64, (3, 10), generator=torch.Generator().manual_seed(7))
    return {"input_ids": ids, "labels": ids}


def _lora_grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.detach().clone() for n, p in model.named_parameters() if p.requires_grad}


def _relative(a: torch.Tensor, b: torch.Tensor) -> float:
    return ((a - b).norm() / b.norm()).item()


@pytest.mark.parametrize("method", ["nf4", "int8"])
def test_lora_gradients_equal_those_of_a_float_model_with_the_decoded_weights(method):
    quantized = make_llama(hidden=HIDDEN)
    quantize(quantized, method)
    reference = make_llama(hidden=HIDDEN)
    with torch.no_grad():
        for path, layer in quantized_layers(quantized):
            reference.get_submodule(path).weight.copy_(layer.dequantize())
    for model in (quantized, reference):
        torch.manual_seed(0)
        lorakit.add_adapter(model, lorakit.LoraConfig(**LORA))
        randomize_lora(model, std=0.1)  # B ≠ 0, so A's gradients are not trivially zero
        model.train()
        loss = model(**_batch()).loss
        loss.backward()
    grads, expected = _lora_grads(quantized), _lora_grads(reference)
    assert grads.keys() == expected.keys() and len(grads) == 28  # 14 layers × (A, B)
    for name, grad in grads.items():
        assert _relative(grad, expected[name]) <= 1e-5, name
    assert all(p.grad is None for m in quantized.modules() if isinstance(m, QuantLinear) for p in m.parameters())


def test_training_keeps_reaching_every_layer_after_eval_and_generate():
    model = make_llama(hidden=HIDDEN)
    quantize(model, "nf4")
    torch.manual_seed(0)
    lorakit.add_adapter(model, lorakit.LoraConfig(**LORA))
    optimizer = torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2)
    batch = _batch()
    assert all(not p.requires_grad for m in model.modules() if isinstance(m, QuantLinear) for p in m.parameters())
    assert {id(p) for g in optimizer.param_groups for p in g["params"]} == {
        id(p) for n, p in model.named_parameters() if ".lora_" in n
    }

    model.train()
    losses = []
    for _ in range(3):
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        optimizer.step()
        losses.append(loss.item())
    optimizer.zero_grad()
    model(**batch).loss.backward()
    before = _lora_grads(model)

    # An eval pass and generation under no_grad, as the training loop and `lorakit eval` do.
    model.eval()
    with torch.no_grad():
        model(**batch)
    model.generate(batch["input_ids"][:, :4], max_new_tokens=3, do_sample=False, pad_token_id=2)
    model.train()

    optimizer.zero_grad()
    model(**batch).loss.backward()
    after = _lora_grads(model)
    assert after.keys() == before.keys() and len(after) == 28
    for name, grad in after.items():
        assert grad.abs().sum() > 0, f"no gradient reaches {name} after an eval pass"
        torch.testing.assert_close(grad, before[name], rtol=0, atol=0)
    for _ in range(3):
        optimizer.step()
        optimizer.zero_grad()
        loss = model(**batch).loss
        loss.backward()
        losses.append(loss.item())
    assert losses[-1] < losses[0] - 0.1


def test_train_command_with_quantize(tmp_path):
    torch.manual_seed(0)
    model_dir = save_tiny_llama(tmp_path / "llama", chat=True)
    data = tmp_path / "pairs.jsonl"
    pairs = [
        ("name[The Vaults], eatType[pub]", "The Vaults is a pub."),
        ("name[Blue Spice], eatType[pub]", "Blue Spice is a pub."),
    ] * 8
    data.write_text("".join(json.dumps({"mr": mr, "text": text}) + "\n" for mr, text in pairs))
    out = tmp_path / "run"
    args = [
        "train",
        "--model",
        str(model_dir),
        "--data",
        str(data),
        "--input-field",
        "mr",
        "--target-field",
        "text",
        "--target-modules",
        "q_proj,v_proj",
        "--r",
        "2",
        "--batch-size",
        "4",
        "--max-steps",
        "3",
        "--eval-examples",
        "2",
        "--lr",
        "0.01",
        "--output",
        str(out),
        "--quiet",
        "--quantize",
        "nf4",
    ]
    result = CliRunner().invoke(app, args)
    assert result.exit_code == 0, result.output
    assert "quantized 14 linear layers to nf4+dq" in result.output
    assert yaml.safe_load((out / "train_config.yaml").read_text())["quantize"] == "nf4"
    tensors = load_file(out / "adapter_model.safetensors")
    assert len(tensors) == 8 and all(".lora_" in key for key in tensors)  # the adapter only, never the base

    bad = CliRunner().invoke(app, [*args[:-1], "int3", "--overwrite"])
    assert bad.exit_code == 2 and "unknown quantization method 'int3'" in bad.output
    assert "Traceback" not in bad.output


@pytest.mark.slow
def test_smollm2_linear_weights_in_nf4_take_under_a_seventh_of_fp32():
    from lorakit.models import load_model

    model, tokenizer = load_model("smollm2-135m")
    text = "The quick brown fox jumps over the lazy dog. Paris is the capital of France."
    batch = tokenizer(text, return_tensors="pt")
    with torch.no_grad():
        float_loss = model(**batch, labels=batch["input_ids"]).loss.item()
    linears = {p: m for p, m in model.named_modules() if type(m) is torch.nn.Linear}
    tied = {p for p, m in linears.items() if m.weight is model.get_input_embeddings().weight}
    fp32_bytes = sum(m.weight.untyped_storage().nbytes() for p, m in linears.items() if p not in tied)

    report = quantize(model, "nf4", double_quant=True)
    assert set(report.quantized) == set(linears) - tied - {"lm_head"} and len(report.quantized) == 210
    stored = sum(
        t.untyped_storage().nbytes() for _, layer in quantized_layers(model) for t in layer.quant_buffers().values()
    )
    assert stored == report.quantized_bytes
    assert fp32_bytes == report.float_bytes
    assert stored <= 0.14 * fp32_bytes  # measured about 0.129
    with torch.no_grad():
        nf4_loss = model(**batch, labels=batch["input_ids"]).loss.item()
    assert nf4_loss < float_loss * 1.25 + 0.1  # still the pretrained model, not noise
