"""bench/e2e_speed.py (bench/train_step.py's end-to-end part): the floor runs on lorakit's own batches (same
encoding, same length-grouped plan), so with B = 0 lorakit's first step and the floor's first batch see the same
tokens and the same loss, and that loss is the loaded model's own (transformers' `model(**batch).loss` on the first
batch, with the prompt's labels masked as lorakit's collator masks them); its table's ratios are plain quotients of
the rows."""

from __future__ import annotations

import pytest
import torch

from support.bench import bench_module


@pytest.fixture(scope="module")
def e2e_speed():
    with bench_module("e2e_speed") as module:
        yield module


def test_the_floor_trains_nothing_on_lorakits_first_batch(e2e_speed):
    from lorakit.models import load_model
    from lorakit.train.batches import feature_batches
    from lorakit.train.data import Collator

    floor = e2e_speed.e2e_child("floor", 1)
    lorakit = e2e_speed.e2e_child("lorakit", 1)

    model, tokenizer = load_model(e2e_speed.MODEL, "causal-lm")
    train, _ = e2e_speed.e2e_data(1)
    features = e2e_speed.encoded(tokenizer, train)
    [(_, first)] = feature_batches(features, e2e_speed.loop_settings(1), 0)
    batch = Collator(tokenizer.pad_token_id)([features[i] for i in first])
    with torch.no_grad():
        expected = float(model(**batch).loss)

    assert floor["tokens"] == lorakit["tokens"] == int(batch["attention_mask"].sum())
    assert floor["final_train_loss"] == pytest.approx(expected, rel=1e-4)
    assert lorakit["final_train_loss"] == pytest.approx(expected, rel=1e-4)
    assert floor["heldout_target_loss"] is None and lorakit["heldout_target_loss"] > 0


def test_the_e2e_table_divides_the_rows(e2e_speed):
    def row(tokens_per_s: float, heldout: float | None) -> dict:
        return {"tokens_per_s": tokens_per_s, "wall_s": 60.0, "final_train_loss": 2.0, "heldout_target_loss": heldout}

    e2e = {"floor": row(300.0, None), "lorakit": row(250.0, 1.7), "peft+trainer": row(150.0, 1.9)}
    lines = e2e_speed.e2e_table(e2e)
    assert "| lorakit | 250 | 1.20 |" in lines[3]
    assert "| peft+trainer | 150 | 2.00 |" in lines[4]
    assert lines[5].startswith("| lorakit ÷ peft+trainer | 1.67× |")
    assert lines[6].startswith("| floor ÷ peft+trainer | 2.00× |")
    del e2e["floor"]
    assert "| lorakit | 250 | – |" in e2e_speed.e2e_table(e2e)[2]
