"""The command line generated from the config fields: help shows each field's default, train and estimate
share their options' defaults, and the older option spellings still work."""

from __future__ import annotations

import json
import re
from pathlib import Path

import pytest
import yaml
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.cli.common import named_folders, one_adapter
from lorakit.metrics import Scores
from lorakit.train import run as run_module
from lorakit.train.config import RunConfig, leaves

runner = CliRunner()
WIDE = {"COLUMNS": "250", "TERMINAL_WIDTH": "250"}


def help_text(*command: str) -> str:
    result = runner.invoke(app, [*command, "--help"], env=WIDE)
    assert result.exit_code == 0, result.output
    return re.sub(r"[│╭╮╰╯─]", " ", result.output)


def default_shown(text: str, flag: str) -> str:
    """The `[default: ...]` on the help line of `flag`."""
    line = next(line for line in text.splitlines() if re.search(rf"(^|[\s,]){re.escape(flag)}([\s,]|$)", line))
    return re.search(r"\[default: \(?(.*?)\)?\]", line).group(1)


def test_train_help_shows_every_field_with_its_default():
    text = help_text("train")
    for leaf in leaves(RunConfig()):
        flag = "--" + leaf.field.name.replace("_", "-")
        if leaf.field.name == "r":
            flag = "--lora-rank"
        assert flag in text, flag
        if isinstance(leaf.value, (int, float, str)) and not isinstance(leaf.value, bool):
            assert default_shown(text, flag) == str(leaf.value), flag
    assert default_shown(text, "--lora-rank") == "16" and default_shown(text, "--lr") == "0.002"
    assert default_shown(text, "--model").startswith("smollm2-135m for causal-lm")


def test_estimate_shares_the_training_defaults():
    train, estimate = help_text("train"), help_text("estimate")
    for flag in (
        "--prefix-length",
        "--prompt-length",
        "--adapter-size",
        "--lora-rank",
        "--alpha",
        "--dropout",
        "--batch-size",
    ):
        assert default_shown(estimate, flag) == default_shown(train, flag), flag
    assert default_shown(estimate, "--prefix-length") == "10"
    # A run's max length is "auto" (from its data); an estimate has no data and takes 256 tokens.
    assert default_shown(estimate, "--max-length") == "256"


def test_model_has_one_help_text():
    first = None
    for command in ("train", "estimate", "eval", "generate", "merge", "combine", "analyze", "serve"):
        line = next(
            line
            for line in help_text(command).splitlines()
            if line.strip().removeprefix("*").strip().startswith("--model")
        )
        text = line.split("--model", 1)[1].split("[", 1)[0].split(";")[0].strip()
        text = text.removeprefix("<str>").removeprefix("TEXT").strip()
        first = first or text
        assert text == first and text.startswith("base model:"), command


@pytest.fixture
def seen(monkeypatch):
    seen = {}

    def fake_run(cfg, log=print):
        seen["cfg"] = cfg
        raise KeyboardInterrupt

    monkeypatch.setattr(run_module, "run_training", fake_run)
    return seen


def test_train_spellings_old_and_new(seen, tmp_path):
    runner.invoke(app, ["train", "--lora-rank", "4", "--quiet", "--resume", "--target-modules", "q_proj,v_proj"])
    cfg = seen["cfg"]
    assert (cfg.r, cfg.progress, cfg.resume, cfg.target_modules) == (4, False, True, ["q_proj", "v_proj"])
    runner.invoke(app, ["train", "--r", "2", "--no-progress", "--method", "prefix", "--prefix-length", "3"])
    cfg = seen["cfg"]
    assert (cfg.r, cfg.progress, cfg.method, cfg.prefix_length, cfg.resume) == (2, False, "prefix", 3, False)


def test_train_reads_a_nested_config_file_and_flags_override_it(seen, tmp_path):
    config = tmp_path / "run.yaml"
    config.write_text("tuning:\n  lora:\n    r: 3\n    alpha: 6\nloop:\n  seed: 5\n  lr: 2.0e-3\n")
    runner.invoke(app, ["train", "--config", str(config), "--r", "2"])
    cfg = seen["cfg"]
    assert (cfg.r, cfg.alpha, cfg.seed, cfg.lr) == (2, 6, 5, 2e-3)
    config.write_text("tuning:\n  rank: 3\n")
    result = runner.invoke(app, ["train", "--config", str(config)])
    assert result.exit_code == 2 and "unknown option(s) tuning.rank" in result.output


def test_estimate_old_compare_spelling(tmp_path):
    path = tmp_path / "tiny.json"
    path.write_text(
        json.dumps({"model_type": "gpt2", "n_embd": 16, "n_head": 2, "n_layer": 2, "n_positions": 32, "vocab_size": 50})
    )
    for flag in ("--compare", "--all-methods"):
        result = runner.invoke(
            app, ["estimate", "--model", str(path), flag, "--json", "--batch-size", "2", "--max-length", "8"]
        )
        assert result.exit_code == 0, result.output
        assert [e["method"] for e in json.loads(result.output)][:2] == ["full", "lora"]


def test_adapter_is_a_folder_and_named_adapters_have_their_own_option(tmp_path):
    (tmp_path / "run.v2").mkdir()
    named = named_folders([str(tmp_path / "run.v2"), "sql=out/sql"], ["chat=out/chat"])
    assert named == {"run_v2": tmp_path / "run.v2", "sql": Path("out/sql"), "chat": Path("out/chat")}
    with pytest.raises(ValueError, match="--named-adapter takes NAME=FOLDER"):
        named_folders([], ["out/chat"])
    with pytest.raises(ValueError, match="two adapters are named 'a'"):
        named_folders(["a=x"], ["a=y"])
    assert one_adapter(tmp_path, None) == one_adapter(None, tmp_path) == tmp_path
    with pytest.raises(ValueError, match="give the adapter folder"):
        one_adapter(None, None)


@pytest.mark.parametrize("flag", ["--combination", "--method"])
def test_combine_reads_both_spellings(tmp_path, flag):
    result = runner.invoke(
        app, ["combine", "--adapter", f"a={tmp_path / 'missing'}", flag, "ties", "--output", str(tmp_path / "out")]
    )
    assert result.exit_code == 2 and "No such option" not in result.output
    assert "missing" in result.output


def test_info_takes_the_folder_as_argument_or_option(tmp_path):
    for args in (["info", str(tmp_path / "nothing")], ["info", "--adapter", str(tmp_path / "nothing")]):
        result = runner.invoke(app, args)
        assert result.exit_code == 2 and "nothing" in result.output and "Traceback" not in result.output


@pytest.mark.parametrize("nested", [False, True])
def test_eval_takes_left_out_data_options_from_the_run(monkeypatch, tmp_path, nested):
    import lorakit.cli.train as train_command

    data = tmp_path / "pairs.jsonl"
    data.write_text(json.dumps({"mr": "name[Pub]", "text": "Pub is a pub."}) + "\n")
    run = RunConfig(data=str(data), input_field="mr", target_field="text", max_length=99).resolved()
    (tmp_path / "run").mkdir()
    (tmp_path / "run" / run_module.CONFIG_FILE).write_text(yaml.safe_dump(run.to_dict(nested=nested)))
    scored = {}

    def fake_evaluate(model, tokenizer, dataset, max_length, max_new_tokens, progress, metrics, decoding):
        scored.update(dataset=dataset, max_length=max_length, max_new_tokens=max_new_tokens)
        return Scores({"bleu": 1.0}), ["Pub is a pub."]

    monkeypatch.setattr(train_command, "load_with_adapters", lambda model, adapters, task, **_: (None, None, task))
    monkeypatch.setattr(train_command, "evaluate_split", fake_evaluate)
    result = runner.invoke(app, ["eval", "--adapter", str(tmp_path / "run"), "--max-new-tokens", "5"])
    assert result.exit_code == 0, result.output
    assert [e.references for e in scored["dataset"].examples] == [["Pub is a pub."]]
    # Lengths are eval's own options (their defaults are the training defaults), not the run's.
    assert (scored["max_length"], scored["max_new_tokens"]) == (RunConfig().max_length, 5)
