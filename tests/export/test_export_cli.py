"""`lorakit export`: the three formats from an adapter folder, and one-line refusals (exit 2) that write nothing."""

from __future__ import annotations

from pathlib import Path

import gguf
import pytest
import torch
import yaml
from transformers import AutoModelForCausalLM
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from support.models import randomize_lora

runner = CliRunner()


def invoke(*args: str | Path):
    result = runner.invoke(app, ["export", *map(str, args)])
    return result.exit_code, result.output


def save_random_adapter(base_dir: Path, folder: Path, quantized: str | None = None, **options) -> Path:
    """A random adapter for the model in base_dir, saved as `lorakit train` saves it (quantized: as a QLoRA run)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir)
    if quantized:
        lorakit.quantize(model, quantized)
    config = {"r": 4, "alpha": 8, "target_modules": ["q_proj", "k_proj", "v_proj", "o_proj"], **options}
    lorakit.add_adapter(model, lorakit.LoraConfig(**config))
    randomize_lora(model, std=0.3)
    lorakit.save_adapter(model, folder, base_model_name_or_path=str(base_dir), task_type="CAUSAL_LM")
    (folder / "train_config.yaml").write_text(yaml.safe_dump({"quantize": quantized, "r": 4}))
    return folder


def adapted_logits(base_dir: Path, adapter: Path | None, ids: torch.Tensor, quantized: str | None = None):
    """What lorakit computes with the adapter, unmerged (on the quantized base for a QLoRA adapter)."""
    model = AutoModelForCausalLM.from_pretrained(base_dir).eval()
    if quantized:
        lorakit.quantize(model, quantized)
    if adapter is not None:
        lorakit.load_adapter(model, adapter)
    with torch.no_grad():
        return model(ids).logits


def gguf_logits(path: Path, ids: torch.Tensor) -> torch.Tensor:
    model = AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()
    with torch.no_grad():
        return model(ids).logits


IDS = torch.tensor([[5, 40, 77, 120, 9, 300, 2]])


@pytest.mark.parametrize("with_adapter", [True, False], ids=["merged", "base-alone"])
def test_gguf_is_the_model_lorakit_runs(chat_llama_dir, tmp_path, with_adapter):
    adapter = save_random_adapter(chat_llama_dir, tmp_path / "adapter")
    output = tmp_path / "out" / "model.gguf"
    args = ("--adapter", adapter) if with_adapter else ("--model", chat_llama_dir)
    code, text = invoke(*args, "--format", "gguf", "--type", "f32", "--output", output)
    assert code == 0, text
    expected = adapted_logits(chat_llama_dir, adapter if with_adapter else None, IDS)
    torch.testing.assert_close(gguf_logits(output, IDS), expected, atol=1e-5, rtol=1e-5)


def test_gguf_lora_holds_the_adapter_alone(chat_llama_dir, tmp_path):
    adapter = save_random_adapter(chat_llama_dir, tmp_path / "adapter")
    code, text = invoke("--adapter", adapter, "--format", "gguf-lora", "--output", tmp_path / "a.gguf")
    assert code == 0, text
    reader = gguf.GGUFReader(tmp_path / "a.gguf")
    assert reader.fields["general.type"].contents() == "adapter"
    assert reader.fields["adapter.lora.alpha"].contents() == 8.0
    assert len(reader.tensors) == 2 * 4 * 2  # A and B of q, k, v, o in 2 blocks
    assert {t.tensor_type.name for t in reader.tensors} == {"F32"}


def test_safetensors_is_the_merge_command(chat_llama_dir, tmp_path):
    adapter = save_random_adapter(chat_llama_dir, tmp_path / "adapter")
    code, text = invoke("--adapter", adapter, "--format", "safetensors", "--output", tmp_path / "exported")
    assert code == 0, text
    assert runner.invoke(app, ["merge", "--adapter", str(adapter), "--output", str(tmp_path / "merged")]).exit_code == 0
    exported = AutoModelForCausalLM.from_pretrained(tmp_path / "exported").state_dict()
    merged = AutoModelForCausalLM.from_pretrained(tmp_path / "merged").state_dict()
    assert exported.keys() == merged.keys() and all(torch.equal(exported[k], merged[k]) for k in merged)
    torch.testing.assert_close(
        AutoModelForCausalLM.from_pretrained(tmp_path / "exported")(IDS).logits,
        adapted_logits(chat_llama_dir, adapter, IDS),
        atol=1e-5,
        rtol=1e-5,
    )


def test_qlora_adapter_needs_dequantize_then_merges_into_the_decoded_base(chat_llama_dir, tmp_path):
    adapter = save_random_adapter(chat_llama_dir, tmp_path / "adapter", quantized="nf4")
    output = tmp_path / "model.gguf"
    code, text = invoke("--adapter", adapter, "--format", "gguf", "--type", "f32", "--output", output)
    assert code == 2 and "nf4-quantized base (QLoRA)" in text and "--dequantize" in text
    assert not output.exists()
    code, text = invoke("--adapter", adapter, "--format", "gguf", "--type", "f32", "--dequantize", "--output", output)
    assert code == 0, text
    expected = adapted_logits(chat_llama_dir, adapter, IDS, quantized="nf4")
    torch.testing.assert_close(gguf_logits(output, IDS), expected, atol=1e-5, rtol=1e-5)


@pytest.mark.parametrize(
    ("args", "message"),
    [
        (("--format", "onnx"), "--format must be one of gguf, gguf-lora, safetensors"),
        (("--format", "gguf", "--type", "q3_k"), "unknown GGUF type 'q3_k'"),
        (("--format", "safetensors", "--type", "q8_0"), "--format safetensors takes --type f32, f16, bf16"),
        (("--format", "gguf-lora", "--dora"), "DoRA adapters cannot be written as a llama.cpp LoRA"),
        (("--format", "gguf", "--existing"), "exists; remove it or choose another --output"),
    ],
    ids=["format", "type", "safetensors-type", "dora", "existing-output"],
)
def test_refusals_are_one_line_and_write_nothing(chat_llama_dir, tmp_path, args, message):
    dora = "--dora" in args
    adapter = save_random_adapter(chat_llama_dir, tmp_path / "adapter", use_dora=dora)
    output = tmp_path / "out.gguf"
    if "--existing" in args:
        output.write_bytes(b"keep")
    options = [a for a in args if a not in ("--dora", "--existing")]
    code, text = invoke("--adapter", adapter, *options, "--output", output)
    assert code == 2
    errors = [line for line in text.splitlines() if line.startswith("error:")]  # (progress bars share the output)
    assert len(errors) == 1 and message in errors[0]
    left = ["adapter", "out.gguf"] if "--existing" in args else ["adapter"]
    assert sorted(p.name for p in tmp_path.iterdir()) == left
    if output.exists():
        assert output.read_bytes() == b"keep"
