"""`lorakit analyze` end to end on a tiny Llama saved on disk: tables on screen, the files, numbers against
the saved weights, and every bad input as a one-line error with exit code 2."""

from __future__ import annotations

import json
from pathlib import Path

import pytest
import torch
from safetensors.torch import load_file
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from support.files import save_tiny_llama
from support.models import randomize_lora

runner = CliRunner()


@pytest.fixture(scope="module")
def saved(tmp_path_factory) -> dict[str, Path]:
    """A tiny Llama on disk and adapters of it: r=2 and r=4 on q_proj, v_proj; r=2 on q_proj only."""
    from transformers import AutoModelForCausalLM

    root = tmp_path_factory.mktemp("analyze")
    torch.manual_seed(0)
    llama = save_tiny_llama(root / "llama")
    folders = {"llama": llama}
    for name, r, targets, seed in (
        ("r2", 2, ["q_proj", "v_proj"], 1),
        ("r4", 4, ["q_proj", "v_proj"], 2),
        ("q_only", 2, ["q_proj"], 3),
    ):
        model = AutoModelForCausalLM.from_pretrained(llama)
        lorakit.add_adapter(model, lorakit.LoraConfig(r=r, alpha=8, target_modules=targets))
        randomize_lora(model, seed=seed)
        folders[name] = lorakit.save_adapter(model, root / name, base_model_name_or_path=str(llama))
    return folders


def test_analyze_with_compare_writes_tables_and_files(saved, tmp_path):
    out = tmp_path / "report"
    result = runner.invoke(app, ["analyze", str(saved["r2"]), "--compare", str(saved["r4"]), "--output", str(out)])
    assert result.exit_code == 0, result.output
    assert "ΔW per layer: r2 (r=2)" in result.output and "subspace similarity φ with r4" in result.output
    assert sorted(p.name for p in out.iterdir()) == [
        "analysis.json",
        "analysis.md",
        "spectrum.png",
        "subspace_self_attn_q_proj.png",
        "subspace_self_attn_v_proj.png",
    ]
    report = json.loads((out / "analysis.json").read_text())
    weights = load_file(saved["llama"] / "model.safetensors")
    tensors = load_file(saved["r2"] / "adapter_model.safetensors")
    for row in report["layers"]:
        weight = weights[row["module"] + ".weight"].double()
        a = tensors[f"base_model.model.{row['module']}.lora_A.weight"].double()
        b = tensors[f"base_model.model.{row['module']}.lora_B.weight"].double()
        delta = (8 / 2) * b @ a
        assert row["weight_norm"] == pytest.approx(float(weight.norm()), rel=1e-6)
        assert row["relative_norm"] == pytest.approx(float(delta.norm() / weight.norm()), rel=1e-6)
    assert [len(row["phi"][0]) for row in report["comparison"]["layers"]] == [4] * 4


def test_default_output_is_inside_the_adapter_and_no_base_skips_weights(saved, tmp_path):
    import shutil

    adapter = Path(shutil.copytree(saved["r2"], tmp_path / "copy"))
    config = json.loads((adapter / "adapter_config.json").read_text())
    config["base_model_name_or_path"] = str(tmp_path / "gone")  # the base is not needed with --no-base
    (adapter / "adapter_config.json").write_text(json.dumps(config))
    result = runner.invoke(app, ["analyze", str(adapter), "--no-base"])
    assert result.exit_code == 0, result.output
    report = json.loads((adapter / "analysis" / "analysis.json").read_text())
    assert report["base_model"] is None and "amplification" not in report["layers"][0]
    assert "comparison" not in report


@pytest.mark.parametrize(
    "extra,message",
    [
        (["--compare", "{q_only}"], "the adapters adapt different modules"),
        (["--factor", "C"], "factor must be one of"),
        (["--model", "{missing}"], "is not a built-in model"),
        (["--compare", "{missing}"], "no adapter folder"),
        (["--output", "{file}"], "exists and is not a folder"),
    ],
)
def test_bad_inputs_give_one_line_errors(saved, tmp_path, extra, message):
    (tmp_path / "file").write_text("x")
    names = {"q_only": saved["q_only"], "missing": tmp_path / "missing", "file": tmp_path / "file"}
    args = ["analyze", str(saved["r2"]), *[e.format(**names) for e in extra]]
    if "--output" not in extra:
        args += ["--output", str(tmp_path / "out")]
    result = runner.invoke(app, args)
    assert result.exit_code == 2, result.output
    assert message in result.output and "Traceback" not in result.output
    assert result.output.strip().startswith("error:")
    assert not (tmp_path / "out").exists()
