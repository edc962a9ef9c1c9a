"""Slow end-to-end runs on the real pretrained models (SmolLM2-135M, MiniLM-L6) and real data: a short
fine-tune must lower the loss, and the adapter must merge into a checkpoint that plain transformers
loads and that gives the same logits as base + adapter."""

from __future__ import annotations

import json

import pytest
import torch
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.models import load_model
from lorakit.train.data import Collator, encode_causal, load_data
from lorakit.train.evaluate import mean_loss

pytestmark = pytest.mark.slow
runner = CliRunner()


def test_smollm2_e2e_short_finetune_learns_and_merges(tmp_path):
    out = tmp_path / "e2e"
    result = runner.invoke(
        app,
        [
            "train",
            "--max-steps",
            "12",
            "--batch-size",
            "4",
            "--eval-examples",
            "4",
            "--max-new-tokens",
            "32",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    assert (out / "adapter_model.safetensors").stat().st_size < 8_000_000  # r 16 on q,k,v,o: 1.84 M float32
    config = json.loads((out / "adapter_config.json").read_text())
    assert config["base_model_name_or_path"] == "smollm2-135m" and config["task_type"] == "CAUSAL_LM"

    merged_dir = tmp_path / "merged"
    result = runner.invoke(app, ["merge", "--adapter", str(out), "--output", str(merged_dir)])
    assert result.exit_code == 0, result.output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir, dtype=torch.float32).eval()
    model, tokenizer = load_model("smollm2-135m")
    lorakit.load_adapter(model, out)
    probe = tokenizer("name[The Eagle], eatType[coffee shop], food[French]", return_tensors="pt").input_ids
    with torch.no_grad():
        torch.testing.assert_close(merged(probe).logits, model.eval()(probe).logits, rtol=1e-4, atol=1e-4)

    # The E2E style is picked up within a few steps: held-out target loss with the adapter against without.
    # (Training-window losses are no measure here: length-grouped batches differ in difficulty.)
    features = [encode_causal(tokenizer, ex, 256) for ex in load_data("e2e", "validation", "causal-lm").examples[:16]]
    collate = Collator(tokenizer.pad_token_id)
    adapted = mean_loss(model, features, collate)
    with lorakit.disable_adapters(model):
        base = mean_loss(model, features, collate)
    assert adapted < 0.9 * base, (adapted, base)


def test_minilm_sst2_learns(tmp_path):
    out = tmp_path / "sst2"
    result = runner.invoke(
        app,
        [
            "train",
            "--data",
            "sst2",
            "--max-steps",
            "60",
            "--batch-size",
            "16",
            "--lr",
            "2e-3",
            "--eval-examples",
            "300",
            "--output",
            str(out),
            "--quiet",
        ],
    )
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    # An untrained head is at chance; 60 steps of LoRA + head lift SST-2 dev accuracy well above it.
    assert results["after"]["accuracy"] > 70, results
