"""The exported files in llama.cpp itself (through llama-cpp-python; skipped where it is not installed — it is not a
lorakit dependency and builds from source): greedy text from the merged GGUF, and from the base GGUF with the LoRA
GGUF on top (llama.cpp's --lora), equals `lorakit generate`'s on the built-in SmolLM2 with an adapter."""

from __future__ import annotations

from pathlib import Path

import pytest
from typer.testing import CliRunner

import lorakit
from lorakit.cli import app
from lorakit.models import load_model
from support.models import randomize_lora

llama_cpp = pytest.importorskip("llama_cpp")
pytestmark = pytest.mark.slow

runner = CliRunner()
PROMPTS = ["name[The Eagle], eatType[pub], area[riverside]", "Describe a pub by the river in one sentence."]
NEW_TOKENS = 24


@pytest.fixture(scope="module")
def exported(tmp_path_factory) -> dict[str, Path]:
    """A random adapter on SmolLM2 (small enough to leave it fluent, large enough to change its text) and its exports,
    all in f32 so that llama.cpp and lorakit compute with the same weights."""
    folder = tmp_path_factory.mktemp("llama-cpp")
    model, _ = load_model("smollm2-135m")
    targets = ["q_proj", "k_proj", "v_proj", "o_proj"]
    lorakit.add_adapter(model, lorakit.LoraConfig(r=8, alpha=16, target_modules=targets))
    randomize_lora(model, std=0.05)
    lorakit.save_adapter(model, folder / "adapter", base_model_name_or_path="smollm2-135m", task_type="CAUSAL_LM")
    files = {"adapter": folder / "adapter"}
    for name, args in {
        "merged": ["--adapter", folder / "adapter", "--format", "gguf"],
        "base": ["--model", "smollm2-135m", "--format", "gguf"],
        "lora": ["--adapter", folder / "adapter", "--format", "gguf-lora"],
    }.items():
        files[name] = folder / f"{name}.gguf"
        result = runner.invoke(app, ["export", *map(str, args), "--type", "f32", "--output", str(files[name])])
        assert result.exit_code == 0, result.output
    return files


def lorakit_text(prompt: str, adapter: Path | None) -> str:
    args = ["generate", "--max-new-tokens", str(NEW_TOKENS), "--device", "cpu", "--precision", "fp32", prompt]
    args += ["--adapter", str(adapter)] if adapter else ["--model", "smollm2-135m"]
    result = runner.invoke(app, args)
    assert result.exit_code == 0, result.output
    return result.stdout.strip()  # the one prompt's text (progress bars go to stderr)


def llama_cpp_text(prompt: str, model: Path, lora: Path | None = None) -> str:
    _, tokenizer = load_model("smollm2-135m")  # the chat template lorakit generate applies
    messages = [{"role": "user", "content": prompt}]
    text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    llm = llama_cpp.Llama(
        model_path=str(model), lora_path=str(lora) if lora else None, n_ctx=256, n_threads=2, verbose=False
    )
    out = llm.create_completion(text, max_tokens=NEW_TOKENS, temperature=0.0, top_k=1)
    return out["choices"][0]["text"].strip()


@pytest.mark.parametrize("prompt", PROMPTS)
def test_llama_cpp_greedy_text_equals_lorakit_generate(exported, prompt):
    expected = lorakit_text(prompt, exported["adapter"])
    assert expected != lorakit_text(prompt, None)  # the adapter changes the text, so the comparison means something
    assert llama_cpp_text(prompt, exported["merged"]) == expected
    assert llama_cpp_text(prompt, exported["base"], lora=exported["lora"]) == expected
