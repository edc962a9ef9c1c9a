"""bench/setups.py's training steps before any update: B starts at zero, so the floor, lorakit (both through lorakit's
fused loss) and PEFT compute the loaded model's own loss (transformers' `model(**batch).loss`, recomputed here on a
separately loaded model), and each trains the parameters it should (LoRA: 30 layers × r · Σ(in + out)). Full
fine-tuning's loss is transformers' own and its bf16 steps take the same code path (left out: a minute of CPU)."""

from __future__ import annotations

import pytest
import torch

from support.bench import bench_module

LORA_PARAMS = 30 * 8 * ((576 + 576) + (576 + 192) + (576 + 192) + (576 + 576))  # q, k, v, o of SmolLM2-135M


@pytest.fixture(scope="module")
def setups():
    with bench_module("setups") as module:
        yield module


@pytest.fixture(scope="module")
def batch_and_loss(setups) -> tuple[dict[str, torch.Tensor], float]:
    from lorakit.models import load_model

    model, _ = load_model(setups.MODEL, "causal-lm")
    ids = torch.randint(3, model.config.vocab_size, (2, 12), generator=torch.Generator().manual_seed(0))
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids), "labels": ids.clone()}
    with torch.no_grad():
        return batch, float(model(**batch).loss)


@pytest.mark.parametrize(("library", "trainable"), [("floor", 0), ("lorakit", LORA_PARAMS), ("peft", LORA_PARAMS)])
def test_first_step_computes_the_loaded_models_loss(setups, batch_and_loss, library, trainable):
    batch, expected = batch_and_loss
    _, step, count = setups.build(library)
    assert count == trainable
    assert step(batch) == pytest.approx(expected, rel=1e-5)


def test_an_unknown_setup_is_refused(setups):
    with pytest.raises(ValueError, match="unknown set-up 'bitfit'"):
        setups.build("bitfit")
