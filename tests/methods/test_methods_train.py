"""`lorakit train --method ...` on tiny saved models: every method trains and writes its own folder and the
cost figures in results.json, `lorakit eval --adapter` scores the folder, a stopped run resumes exactly, and
options that do not fit a method are one-line errors."""

from __future__ import annotations

import json
import resource
import shutil
import time
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

from lorakit.cli import app
from lorakit.methods import CONFIG_NAME, WEIGHTS_NAME
from support.files import save_tiny_bert, save_tiny_llama

runner = CliRunner()


@pytest.fixture(scope="module")
def tiny(tmp_path_factory) -> dict[str, Path]:
    root = tmp_path_factory.mktemp("methods")
    torch.manual_seed(0)
    llama, bert = save_tiny_llama(root / "llama", chat=True), save_tiny_bert(root / "bert")
    pairs = root / "pairs.jsonl"
    rows = [{"mr": f"name[Pub {i}]", "text": f"Pub {i} is a pub."} for i in range(16)]
    pairs.write_text("".join(json.dumps(row) + "\n" for row in rows))
    reviews = root / "reviews.tsv"
    reviews.write_text("sentence\tlabel\n" + "it 's a charming journey .\t1\na dull and tired film .\t0\n" * 10)
    return {"llama": llama, "bert": bert, "pairs": pairs, "reviews": reviews}


def train(tiny: dict[str, Path], key: str, method: str, out: Path, *extra: str):
    data = (
        ["--data", str(tiny["pairs"]), "--input-field", "mr", "--target-field", "text"]
        if key == "llama"
        else ["--data", str(tiny["reviews"]), "--task", "seq-cls"]
    )
    args = [
        "train",
        "--model",
        str(tiny[key]),
        *data,
        "--method",
        method,
        "--adapter-size",
        "4",
        "--prefix-length",
        "2",
        "--prompt-length",
        "2",
        "--batch-size",
        "4",
        "--max-steps",
        "4",
        "--eval-examples",
        "2",
        "--lr",
        "0.01",
        "--output",
        str(out),
        "--quiet",
        *extra,
    ]
    started = time.perf_counter()
    result = runner.invoke(app, args)
    result.wall_ms = 1000 * (time.perf_counter() - started)
    return result, result.output


@pytest.mark.parametrize(
    "key, method",
    [("llama", m) for m in ("full", "adapter", "prefix", "prompt")] + [("bert", m) for m in ("bitfit", "head")],
)
def test_train_writes_the_methods_folder_and_costs(tiny, tmp_path, key, method):
    out = tmp_path / "run"
    result, output = train(tiny, key, method, out)
    assert result.exit_code == 0, output
    assert (out / CONFIG_NAME).is_file() and not (out / "adapter_model.safetensors").exists()
    results = json.loads((out / "results.json").read_text())
    tensors = load_file(out / WEIGHTS_NAME)
    assert results["method"] == method
    assert results["train"]["trainable_parameters"] == sum(t.numel() for t in tensors.values())
    assert results["checkpoint_mb"] == round((out / WEIGHTS_NAME).stat().st_size / 2**20, 3)
    assert set(results["latency_ms"]) == {"base", method}
    # Each latency is the median of 5 timed forward passes (after a warm-up), all within the run's wall time: at
    # least 3 of the 5 take the median or longer (a bound that holds however uneven the passes are on a busy CPU).
    assert 0 < 3 * sum(results["latency_ms"].values()) < result.wall_ms
    # The sampled peak is at most the process's lifetime peak (the run is in this process; the kernel's
    # high-water mark is synced lazily from per-thread counters, so it may lag a sample by a few hundred KB),
    # and the growth during training is part of it.
    lifetime_peak_mb = resource.getrusage(resource.RUSAGE_SELF).ru_maxrss / 1024
    assert 0 <= results["train"]["rss_growth_mb"] < results["train"]["peak_rss_mb"] <= lifetime_peak_mb + 4
    if method == "full":  # the whole model, every tensor trained
        assert len(tensors) == len(list(load_file(tiny["llama"] / "model.safetensors")))

    result, output = runner.invoke(app, ["eval", "--adapter", str(out), "--limit", "2"]), None
    assert result.exit_code == 0, result.output
    assert ("accuracy" if key == "bert" else "bleu") in result.output


def test_lora_results_show_the_merged_latency(tiny, tmp_path):
    result, output = train(tiny, "bert", "lora", tmp_path / "run", "--target-modules", "query,value")
    assert result.exit_code == 0, output
    latency = json.loads((tmp_path / "run" / "results.json").read_text())["latency_ms"]
    assert set(latency) == {"base", "lora", "lora_merged"}


def test_a_stopped_adapter_run_resumes_exactly(tiny, tmp_path):
    whole, split = tmp_path / "whole", tmp_path / "split"
    assert train(tiny, "bert", "adapter", whole)[0].exit_code == 0
    assert train(tiny, "bert", "adapter", split, "--save-every", "2")[0].exit_code == 0
    # Keep only the step-2 checkpoint, as a crash after it would.
    for name in (WEIGHTS_NAME, CONFIG_NAME):
        (split / name).unlink()
    shutil.rmtree(split / "checkpoints" / "step-000004")
    result, output = train(tiny, "bert", "adapter", split, "--save-every", "2", "--resume")
    assert result.exit_code == 0, output
    a, b = load_file(whole / WEIGHTS_NAME), load_file(split / WEIGHTS_NAME)
    assert a.keys() == b.keys()
    for key in a:
        torch.testing.assert_close(a[key], b[key], rtol=0, atol=1e-6)
    step2 = load_file(split / "checkpoints" / "step-000002" / WEIGHTS_NAME)
    assert any(not torch.equal(step2[k], b[k]) for k in b)  # the resumed run did train


@pytest.mark.parametrize(
    "key, method, extra, message",
    [
        ("llama", "bitfit", (), "--method bitfit: LlamaForCausalLM has no bias parameters"),
        ("llama", "head", (), "--method head: linear probing"),
        ("llama", "ia3", (), "unknown method 'ia3'"),
        ("llama", "adapter", ("--quantize", "nf4"), "does not combine with --method adapter"),
        ("bert", "prompt", ("--prompt-length", "0"), "prompt_length must be a positive integer"),
    ],
)
def test_bad_method_options_are_one_line_errors(tiny, tmp_path, key, method, extra, message):
    result, output = train(tiny, key, method, tmp_path / "run", *extra)
    assert result.exit_code == 2, output
    assert message in " ".join(output.split()) and "Traceback" not in output
