"""`lorakit train` on each data format and task type, with tiny files the tests write and tiny random models:
a header-less TSV, a separate evaluation file, chat `messages`, long rows, regression and 3-class
classification."""

from __future__ import annotations

import json
import random
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoTokenizer
from typer.testing import CliRunner

from lorakit.cli import app
from support.files import E2E_PAIRS, save_tiny_bert, write_pairs

runner = CliRunner()
# Rank 4: the tiny models' k and v projections are 8 wide, below lorakit train's rank 16.
FAST = ["--max-steps", "2", "--batch-size", "4", "--eval-examples", "2", "--max-new-tokens", "4", "--quiet", "--r", "4"]


@pytest.fixture(scope="module")
def bert_dir(tmp_path_factory) -> Path:
    torch.manual_seed(0)
    return save_tiny_bert(tmp_path_factory.mktemp("bert"))


def train(tmp_path: Path, *args: str) -> tuple[str, Path]:
    out = tmp_path / "run"
    result = runner.invoke(app, ["train", *args, *FAST, "--output", str(out)])
    assert result.exit_code == 0, result.output
    return result.output, out


def results(out: Path) -> dict:
    return json.loads((out / "results.json").read_text())


def predictions(out: Path) -> list[dict]:
    return [json.loads(line) for line in (out / "predictions_after.jsonl").read_text().splitlines()]


def test_header_less_tsv_with_columns(bert_dir, tmp_path):
    lines = ["gj04\t1\t\tthe pub is near .", "gj04\t0\t*\tpub the near is ."] * 10
    data = tmp_path / "train.tsv"
    data.write_text("\n".join(lines) + "\n")
    args = ["--model", str(bert_dir), "--data", str(data), "--columns", "source,label,mark,sentence"]
    output, out = train(tmp_path, *args, "--input-field", "sentence")
    assert "task: seq-cls (the target column 'label' holds 2 labels)" in output
    assert set(results(out)["after"]) >= {"accuracy", "f1", "mcc"}
    assert yaml.safe_load((out / "train_config.yaml").read_text())["columns"] == ["source", "label", "mark", "sentence"]
    # eval takes the columns (and the other data options) from the run.
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--output", str(tmp_path / "eval.json")])
    assert result.exit_code == 0, result.output
    assert len(json.loads((tmp_path / "eval.json").read_text())["predictions"]) == len(lines)


def test_eval_data_is_scored_and_saved_and_auto_max_length_keeps_every_row(chat_llama_dir, tmp_path):
    data = write_pairs(tmp_path / "train.jsonl", E2E_PAIRS)
    dev_pairs = [("name[Blue Spice], near[The Vaults]", "Blue Spice is near The Vaults."), *E2E_PAIRS[:2]]
    dev = write_pairs(tmp_path / "dev.jsonl", dev_pairs)
    args = ["--model", str(chat_llama_dir), "--data", str(data), "--validation-data", str(dev)]
    output, out = train(tmp_path, *args, "--input-field", "mr", "--target-field", "text")
    words = " ".join(output.split())  # as printed, without the console's line breaks
    assert f"{len(E2E_PAIRS)} training, 3 validation, 2 scored examples (from {dev})" in words
    assert "task: causal-lm (text targets)" in words
    assert [row["references"] for row in predictions(out)] == [[text] for _, text in dev_pairs[:2]]
    assert yaml.safe_load((out / "train_config.yaml").read_text())["eval_data"] == str(dev)
    # Auto max length: the longest training or validation row, so that none is cut.
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    longest = max(encoded_length(tokenizer, mr, text) for mr, text in E2E_PAIRS + dev_pairs)
    assert f"max length: {longest} tokens (auto" in words
    assert results(out)["data"]["max_length"] == longest
    assert results(out)["data"]["training"] == {"rows": len(E2E_PAIRS), "truncated": 0, "dropped": 0}


def test_chat_messages(chat_llama_dir, tmp_path):
    rows = [
        {"messages": [{"role": "user", "content": mr}, {"role": "assistant", "content": text}]}
        for mr, text in E2E_PAIRS
    ]
    data = tmp_path / "chat.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    output, out = train(tmp_path, "--model", str(chat_llama_dir), "--data", str(data))
    assert "task: causal-lm (the rows hold chat messages)" in output
    scored = predictions(out)
    assert all(row["prompt"][0]["role"] == "user" and len(row["references"]) == 1 for row in scored)


def encoded_length(tokenizer, prompt: str, target: str) -> int:
    """A row as the chat template writes it: user turn, assistant header, target, EOS."""
    messages = [{"role": "user", "content": prompt}]
    prompt_ids = tokenizer.apply_chat_template(messages, add_generation_prompt=True, tokenize=True, return_dict=True)
    return len(prompt_ids["input_ids"]) + len(tokenizer(target, add_special_tokens=False).input_ids) + 1


def test_long_rows_never_stop_a_run(chat_llama_dir, tmp_path):
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    limit = max(encoded_length(tokenizer, mr, text) for mr, text in E2E_PAIRS)
    long_mr = "name[The Vaults], " * 30
    pairs = [(long_mr, "The Vaults."), (long_mr + "eatType[pub]", "A pub.")] + E2E_PAIRS
    data = write_pairs(tmp_path / "train.jsonl", pairs)
    eval_file = write_pairs(tmp_path / "dev.jsonl", E2E_PAIRS[:4])  # every long row is a training row
    args = [
        "--model",
        str(chat_llama_dir),
        "--data",
        str(data),
        "--eval-data",
        str(eval_file),
        "--max-length",
        str(limit),
    ]
    output, out = train(tmp_path, *args, "--input-field", "mr", "--target-field", "text")
    assert sum(encoded_length(tokenizer, mr, text) > limit for mr, text in pairs) == 2
    assert results(out)["data"]["training"] == {"rows": len(pairs), "truncated": 2, "dropped": 0}
    assert f"long rows: 2 truncated of {len(pairs)} training rows" in " ".join(output.split())


def test_regression_is_inferred_from_a_numeric_target(bert_dir, tmp_path):
    rng = random.Random(0)
    rows = [{"sentence": "pub " * n, "score": 0.5 + 0.8 * n + rng.random() / 10} for n in range(1, 5)] * 5
    data = tmp_path / "stsb.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    args = ["--model", str(bert_dir), "--data", str(data), "--target-field", "score"]
    output, out = train(tmp_path, *args, "--eval-examples", "4")
    assert "task: regression (the target column is numeric)" in output
    assert yaml.safe_load((out / "train_config.yaml").read_text())["task"] == "regression"
    assert load_file(out / "adapter_model.safetensors")["base_model.model.classifier.weight"].shape[0] == 1
    assert {"pearson", "spearman"} <= set(results(out)["after"])
    assert all(isinstance(row["prediction"], float) for row in predictions(out))


def test_three_class_pairs(bert_dir, tmp_path):
    labels = ["entailment", "neutral", "contradiction"]
    rows = [{"premise": f"the pub {i}", "hypothesis": f"a pub {i}", "label": labels[i % 3]} for i in range(24)]
    data = tmp_path / "mnli.jsonl"
    data.write_text("".join(json.dumps(row) + "\n" for row in rows))
    fields = ["--input-field", "premise", "--pair-field", "hypothesis"]
    output, out = train(tmp_path, "--model", str(bert_dir), "--data", str(data), *fields, "--eval-examples", "6")
    assert "task: seq-cls (the target column 'label' holds 3 labels)" in output
    assert load_file(out / "adapter_model.safetensors")["base_model.model.classifier.weight"].shape[0] == 3
    assert {row["label"] for row in predictions(out)} <= {0, 1, 2}
    assert all(row["prediction"] in (0, 1, 2) for row in predictions(out))
