"""End to end through the command line on tiny random models: train → eval → generate → merge → reload,
resume, and every bad input of the training command (one-line error, exit code ≠ 0, nothing written)."""

from __future__ import annotations

import json
import shutil
from pathlib import Path

import pytest
import torch
import yaml
from safetensors.torch import load_file
from transformers import AutoModelForCausalLM, AutoTokenizer
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from support.files import E2E_PAIRS, save_tiny_bert, write_pairs

runner = CliRunner()


@pytest.fixture(scope="module")
def gen_data(tmp_path_factory) -> Path:
    path = tmp_path_factory.mktemp("data") / "pairs.jsonl"
    return write_pairs(path, E2E_PAIRS)


def train_args(model: Path, data: Path, out: Path, *extra: str) -> list[str]:
    return [
        "train",
        "--model",
        str(model),
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
        "6",
        "--eval-examples",
        "2",
        "--lr",
        "0.01",
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]


def invoke(args: list[str]):
    result = runner.invoke(app, args)
    return result, result.output


def test_train_writes_adapter_logs_and_scores(chat_llama_dir, gen_data, tmp_path):
    out = tmp_path / "run"
    result, output = invoke(train_args(chat_llama_dir, gen_data, out, "--save-every", "3"))
    assert result.exit_code == 0, output
    for name in (
        "adapter_config.json",
        "adapter_model.safetensors",
        "train_config.yaml",
        "metrics.jsonl",
        "loss.png",
        "results.json",
        "predictions_before.jsonl",
        "predictions_after.jsonl",
    ):
        assert (out / name).is_file(), name
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert config["r"] == 2 and config["target_modules"] == ["q_proj", "v_proj"] and config["task"] == "causal-lm"
    results = json.loads((out / "results.json").read_text())
    assert set(results["before"]) == {"bleu", "nist", "chrf", "rouge_l"} and results["train"]["steps"] == 6
    losses = [json.loads(line) for line in (out / "metrics.jsonl").read_text().splitlines()]
    assert [entry["step"] for entry in losses if "loss" in entry] == [5, 6]
    tensors = load_file(out / "adapter_model.safetensors")
    # Two layers × (q, v) × (A, B), nothing else: the adapter file holds the adapter only.
    assert len(tensors) == 8 and all(".lora_" in key for key in tensors)
    assert sorted(p.name for p in (out / "checkpoints").iterdir()) == ["step-000003", "step-000006"]


def test_without_base_scoring_only_the_trained_model_is_scored(chat_llama_dir, gen_data, tmp_path):
    out = tmp_path / "run"
    result, output = invoke(train_args(chat_llama_dir, gen_data, out, "--no-score-base"))
    assert result.exit_code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert results["before"] == {} and set(results["after"]) == {"bleu", "nist", "chrf", "rouge_l"}
    assert not (out / "predictions_before.jsonl").exists() and (out / "predictions_after.jsonl").is_file()


def test_train_eval_generate_merge_reload(chat_llama_dir, gen_data, tmp_path):
    out = tmp_path / "run"
    assert invoke(train_args(chat_llama_dir, gen_data, out))[0].exit_code == 0

    result, output = invoke(
        [
            "eval",
            "--model",
            str(chat_llama_dir),
            "--adapter",
            str(out),
            "--data",
            str(gen_data),
            "--limit",
            "3",
            "--output",
            str(tmp_path / "eval.json"),
        ]
    )
    assert result.exit_code == 0, output
    assert set(json.loads((tmp_path / "eval.json").read_text())["metrics"]) == {"bleu", "nist", "chrf", "rouge_l"}

    # Greedy decoding written out with argmax over the adapted model's logits, as the reference.
    model = AutoModelForCausalLM.from_pretrained(chat_llama_dir)
    tokenizer = AutoTokenizer.from_pretrained(chat_llama_dir)
    lorakit.load_adapter(model, out)
    model.eval()
    prompt = E2E_PAIRS[0][0]
    ids = tokenizer.apply_chat_template(
        [{"role": "user", "content": prompt}],
        add_generation_prompt=True,
        tokenize=True,
        return_dict=True,
        return_tensors="pt",
    )["input_ids"]
    new = []
    with torch.no_grad():
        for _ in range(8):
            token = int(model(ids).logits[0, -1].argmax())
            if token == tokenizer.eos_token_id:
                break
            new.append(token)
            ids = torch.cat([ids, torch.tensor([[token]])], dim=1)
    expected = tokenizer.decode(new, skip_special_tokens=True).strip()
    result, output = invoke(
        ["generate", "--model", str(chat_llama_dir), "--adapter", str(out), "--max-new-tokens", "8", prompt]
    )
    assert result.exit_code == 0, output
    assert result.stdout.strip() == expected

    merged_dir = tmp_path / "merged"
    result, output = invoke(
        ["merge", "--model", str(chat_llama_dir), "--adapter", str(out), "--output", str(merged_dir)]
    )
    assert result.exit_code == 0, output
    merged = AutoModelForCausalLM.from_pretrained(merged_dir).eval()  # plain transformers, no lorakit
    assert not any("lora" in name for name, _ in merged.named_parameters())
    probe = torch.randint(0, len(tokenizer), (2, 9))
    with torch.no_grad():
        torch.testing.assert_close(merged(probe).logits, model(probe).logits, rtol=1e-5, atol=1e-5)
    assert AutoTokenizer.from_pretrained(merged_dir)("The Vaults").input_ids == tokenizer("The Vaults").input_ids

    result, output = invoke(["info", str(out)])
    assert result.exit_code == 0 and "q_proj.lora_A" in output and "r=2" in output


def test_resume_continues_exactly(chat_llama_dir, gen_data, tmp_path):
    full, split = tmp_path / "full", tmp_path / "split"
    assert invoke(train_args(chat_llama_dir, gen_data, full, "--dropout", "0.1"))[0].exit_code == 0
    # A run that stopped after step 3: keep only its step-3 checkpoint, as a crash would.
    assert (
        invoke(train_args(chat_llama_dir, gen_data, split, "--dropout", "0.1", "--save-every", "3"))[0].exit_code == 0
    )
    for name in ("adapter_model.safetensors", "adapter_config.json"):
        (split / name).unlink()
    shutil.rmtree(split / "checkpoints" / "step-000006")
    result, output = invoke(
        train_args(chat_llama_dir, gen_data, split, "--dropout", "0.1", "--save-every", "3", "--resume")
    )
    assert result.exit_code == 0, output
    a, b = load_file(full / "adapter_model.safetensors"), load_file(split / "adapter_model.safetensors")
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    # The resumed run did train: its weights differ from the step-3 checkpoint.
    c = load_file(split / "checkpoints" / "step-000003" / "adapter_model.safetensors")
    assert any(not torch.equal(c[k], b[k]) for k in c)


def test_seq_cls_trains_head_and_adapter(tmp_path):
    torch.manual_seed(0)
    bert = save_tiny_bert(tmp_path / "bert")
    rows = ["sentence\tlabel"] + ["it 's a charming journey .\t1", "a dull and tired film .\t0"] * 10
    data = tmp_path / "reviews.tsv"
    data.write_text("\n".join(rows) + "\n")
    out = tmp_path / "cls"
    result, output = invoke(
        [
            "train",
            "--model",
            str(bert),
            "--data",
            str(data),
            "--task",
            "seq-cls",
            "--target-modules",
            "query,value",
            "--max-steps",
            "3",
            "--batch-size",
            "4",
            "--output",
            str(out),
            "--quiet",
        ]
    )
    assert result.exit_code == 0, output
    results = json.loads((out / "results.json").read_text())
    assert set(results["after"]) == {"accuracy", "f1", "mcc"}
    tensors = load_file(out / "adapter_model.safetensors")
    assert {"base_model.model.classifier.weight", "base_model.model.classifier.bias"} <= set(tensors)
    assert json.loads((out / "adapter_config.json").read_text())["task_type"] == "SEQ_CLS"
    result, output = invoke(["eval", "--model", str(bert), "--adapter", str(out), "--data", str(data)])
    assert result.exit_code == 0, output
    assert "accuracy" in output


@pytest.mark.parametrize(
    "change, message",
    [
        ({"--data": "missing.jsonl"}, "data file not found"),
        ({"--target-field": "answer"}, "no target field 'answer'"),
        ({"--target-modules": "q_proj,v_prj"}, "v_prj"),
        ({"--long-rows": "cut"}, "unknown --long-rows 'cut'"),
        ({"--r": "0"}, "r must be a positive integer"),
    ],
)
def test_bad_training_input_is_one_line_error(chat_llama_dir, gen_data, tmp_path, change, message):
    out = tmp_path / "run"
    args = train_args(chat_llama_dir, gen_data, out)
    for flag, value in change.items():
        if flag in args:
            args[args.index(flag) + 1] = value
        else:
            args += [flag, value]
    result, output = invoke(args)
    assert result.exit_code == 2, output
    assert message in output and "Traceback" not in output
    assert not out.exists()


def test_empty_data_set(chat_llama_dir, tmp_path):
    empty = tmp_path / "empty.jsonl"
    empty.write_text("")
    result, output = invoke(train_args(chat_llama_dir, empty, tmp_path / "run"))
    assert result.exit_code == 2 and "empty" in output


def test_output_holding_another_run_is_refused(chat_llama_dir, gen_data, tmp_path):
    out = tmp_path / "run"
    assert invoke(train_args(chat_llama_dir, gen_data, out))[0].exit_code == 0
    before = {p: p.read_bytes() for p in out.rglob("*") if p.is_file()}
    result, output = invoke(train_args(chat_llama_dir, gen_data, out, "--r", "4"))
    assert result.exit_code == 2 and "already holds a run" in output
    result, output = invoke(train_args(chat_llama_dir, gen_data, out, "--r", "4", "--resume"))
    assert result.exit_code == 2 and "different r" in output
    assert {p: p.read_bytes() for p in out.rglob("*") if p.is_file()} == before


def test_config_file_with_flag_override(chat_llama_dir, gen_data, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text(yaml.safe_dump({"r": 3, "alpha": 6, "max_steps": 2, "seed": 5}))
    out = tmp_path / "run"
    result, output = invoke(train_args(chat_llama_dir, gen_data, out, "--config", str(config)))
    assert result.exit_code == 0, output
    resolved = yaml.safe_load((out / "train_config.yaml").read_text())
    # The flags in train_args (r=2, max_steps=6) override the file; the rest comes from it.
    assert (resolved["r"], resolved["alpha"], resolved["max_steps"], resolved["seed"]) == (2, 6, 6, 5)
    config.write_text(yaml.safe_dump({"rank": 3}))
    result, output = invoke(train_args(chat_llama_dir, gen_data, tmp_path / "other", "--config", str(config)))
    assert result.exit_code == 2 and "unknown option(s) rank" in output


def test_length_grouping_can_be_switched_off(chat_llama_dir, gen_data, tmp_path):
    grouped, plain = tmp_path / "grouped", tmp_path / "plain"
    assert invoke(train_args(chat_llama_dir, gen_data, grouped, "--eval-examples", "0"))[0].exit_code == 0
    result, output = invoke(train_args(chat_llama_dir, gen_data, plain, "--eval-examples", "0", "--no-group-by-length"))
    assert result.exit_code == 0, output
    assert yaml.safe_load((grouped / "train_config.yaml").read_text())["group_by_length"] is True
    assert yaml.safe_load((plain / "train_config.yaml").read_text())["group_by_length"] is False
    # Other batches, so other weights.
    a, b = load_file(grouped / "adapter_model.safetensors"), load_file(plain / "adapter_model.safetensors")
    assert any(not torch.equal(a[k], b[k]) for k in a)
