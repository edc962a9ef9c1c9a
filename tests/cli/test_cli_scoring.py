"""Scoring from the command line: `--metrics` and the decoding options on `lorakit train`, `eval` (which takes
them from the run when not given) and `generate`; results.json and `eval --output` name each metric's
implementation and list the metrics skipped."""

import json
from pathlib import Path

import pytest
import yaml
from scipy.stats import pearsonr, spearmanr
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.cli.common import load_with_adapters
from lorakit.generate import Decoding, generate_texts
from lorakit.metrics import METRICS, implementation
from lorakit.train.data import format_prompt, load_data
from support.files import E2E_PAIRS, save_tiny_bert, write_pairs

runner = CliRunner()


@pytest.fixture(scope="module")
def pairs(tmp_path_factory) -> Path:
    return write_pairs(tmp_path_factory.mktemp("scoring") / "pairs.jsonl", E2E_PAIRS)


def train(model: Path, data: Path, out: Path, *extra: str):
    args = ["train", "--model", str(model), "--data", str(data), "--input-field", "mr", "--target-field", "text"]
    args += ["--target-modules", "q_proj,v_proj", "--r", "2", "--max-steps", "2", "--batch-size", "4"]
    return runner.invoke(app, [*args, "--eval-examples", "2", "--max-new-tokens", "6", "--output", str(out), *extra])


def test_train_and_eval_report_the_chosen_metrics_and_their_implementations(chat_llama_dir, pairs, tmp_path):
    out = tmp_path / "run"
    result = train(chat_llama_dir, pairs, out, "--metrics", "exact_match,bleu", "--num-beams", "2", "--quiet")
    assert result.exit_code == 0, result.output
    results = json.loads((out / "results.json").read_text())
    assert list(results["before"]) == list(results["after"]) == ["exact_match", "bleu"]
    assert results["metric_implementations"] == {name: implementation(name) for name in ("exact_match", "bleu")}
    assert results["skipped_metrics"] == {}
    config = yaml.safe_load((out / "train_config.yaml").read_text())
    assert (config["metrics"], config["num_beams"], config["no_repeat_ngram_size"]) == (["exact_match", "bleu"], 2, 0)

    report = tmp_path / "eval.json"
    result = runner.invoke(app, ["eval", "--adapter", str(out), "--limit", "2", "--output", str(report)])
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    assert list(written["metrics"]) == ["exact_match", "bleu"]  # the run's metrics
    assert set(written["metric_implementations"]) == {"exact_match", "bleu"} and written["skipped_metrics"] == {}

    args = ["eval", "--adapter", str(out), "--limit", "2", "--output", str(report), "--metrics", "rouge_1,rouge_2"]
    assert runner.invoke(app, args).exit_code == 0
    assert list(json.loads(report.read_text())["metrics"]) == ["rouge_1", "rouge_2"]

    result = runner.invoke(app, ["eval", "--adapter", str(out), "--limit", "2", "--metrics", "accuracy"])
    assert result.exit_code == 2
    assert "accuracy do not score a causal-lm task" in result.output


@pytest.mark.parametrize(
    ("extra", "message"),
    [
        (["--metrics", "bleu,blue"], f"unknown metric(s) blue; known: {', '.join(METRICS)}"),
        (["--num-beams", "0"], "num_beams must be at least 1"),
    ],
)
def test_bad_scoring_options_stop_before_anything_is_written(chat_llama_dir, pairs, tmp_path, extra, message):
    result = train(chat_llama_dir, pairs, tmp_path / "run", *extra)
    assert result.exit_code == 2
    assert message in " ".join(result.output.split())
    assert not (tmp_path / "run").exists()


def test_generate_decodes_with_the_options_given(chat_llama_dir):
    prompt = "name[The Vaults], eatType[pub]"
    args = ["generate", prompt, "--model", str(chat_llama_dir), "--max-new-tokens", "8"]
    result = runner.invoke(app, [*args, "--num-beams", "3", "--length-penalty", "0.9", "--no-repeat-ngram-size", "2"])
    assert result.exit_code == 0, result.output
    model, tokenizer, _ = load_with_adapters(str(chat_llama_dir), [], "causal-lm")
    decoding = Decoding(num_beams=3, length_penalty=0.9, no_repeat_ngram_size=2)
    expected = generate_texts(model, tokenizer, [format_prompt(tokenizer, prompt)], 8, decoding=decoding)
    assert result.stdout == "".join(text + "\n" for text in expected)  # (a random model's text has odd characters)


def test_eval_of_a_regression_adapter_reports_correlations_of_the_single_output(tmp_path):
    data = tmp_path / "scores.csv"
    data.write_text("sentence,score\n" + "".join(f"this is {w},{s}\n" for w, s in [("good", 4.2), ("bad", 1.1)] * 4))
    args = ["train", "--model", str(save_tiny_bert(tmp_path / "bert")), "--data", str(data), "--task", "regression"]
    args += ["--input-field", "sentence", "--target-field", "score", "--target-modules", "query,value"]
    result = runner.invoke(app, [*args, "--max-steps", "1", "--eval-examples", "0", "--output", str(tmp_path / "run")])
    assert result.exit_code == 0, result.output
    report = tmp_path / "eval.json"
    result = runner.invoke(
        app, ["eval", "--adapter", str(tmp_path / "run"), "--split", "train", "--output", str(report)]
    )
    assert result.exit_code == 0, result.output
    written = json.loads(report.read_text())
    predictions, targets = written["predictions"], [4.2, 1.1] * 4
    assert all(isinstance(p, float) for p in predictions)
    assert written["metrics"]["pearson"] == pytest.approx(100 * pearsonr(predictions, targets).statistic)
    assert written["metrics"]["spearman"] == pytest.approx(100 * spearmanr(predictions, targets).statistic)


def test_a_skipped_metric_prints_its_reason_verbatim(capsys):
    """Square brackets in a reason (`lorakit[coco]`) are text, not console markup."""
    from lorakit.cli.train import _print_skipped

    _print_skipped({"meteor": "needs the pycocoevalcap package: pip install 'lorakit[coco]'"})
    printed = " ".join(capsys.readouterr().out.split())  # the console may wrap the line
    assert "meteor not computed: needs the pycocoevalcap package: pip install 'lorakit[coco]'" in printed


def test_a_plain_format_run_is_scored_and_prompted_in_its_format(chat_llama_dir, pairs, tmp_path):
    out = tmp_path / "run"
    result = train(chat_llama_dir, pairs, out, "--prompt-format", "plain", "--template", "MR {mr}", "--quiet")
    assert result.exit_code == 0, result.output
    scored = [json.loads(line)["prompt"] for line in (out / "predictions_after.jsonl").read_text().splitlines()]
    assert scored and all(p.startswith("MR ") for p in scored)

    model, tokenizer, _ = load_with_adapters(None, [out], "causal-lm")
    plain = f"{tokenizer.bos_token}MR name[The Vaults], eatType[pub]\n"  # no chat template: BOS, text, newline
    expected = generate_texts(model, tokenizer, [plain], 6, decoding=Decoding())
    result = runner.invoke(
        app, ["generate", "MR name[The Vaults], eatType[pub]", "--adapter", str(out), "--max-new-tokens", "6"]
    )
    assert result.exit_code == 0, result.output
    assert result.stdout == expected[0] + "\n"

    report = tmp_path / "eval.json"
    result = runner.invoke(
        app, ["eval", "--adapter", str(out), "--limit", "2", "--max-new-tokens", "6", "--output", str(report)]
    )
    assert result.exit_code == 0, result.output
    inputs = [f"{tokenizer.bos_token}MR {mr}\n" for mr, _ in E2E_PAIRS[:2]]  # the file's first two rows
    expected = generate_texts(model, tokenizer, inputs, 6, decoding=Decoding())
    assert json.loads(report.read_text())["predictions"] == expected


def test_eval_without_a_run_prompts_as_a_run_on_that_data_would(chat_llama_dir, tmp_path):
    report = tmp_path / "eval.json"
    args = ["eval", "--model", str(chat_llama_dir), "--data", "e2e", "--limit", "2", "--max-new-tokens", "4"]
    result = runner.invoke(app, [*args, "--output", str(report)])
    assert result.exit_code == 0, result.output
    model, tokenizer, _ = load_with_adapters(str(chat_llama_dir), [], "causal-lm")
    mrs = [e.prompt.split(": ", 1)[1] for e in load_data("e2e", "test").examples[:2]]  # the instruction's MR
    inputs = [f"{tokenizer.bos_token}{mr}\n" for mr in mrs]  # e2e's defaults: plain format, the MR alone
    assert json.loads(report.read_text())["predictions"] == generate_texts(
        model, tokenizer, inputs, 4, decoding=Decoding()
    )
