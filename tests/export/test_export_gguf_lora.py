"""lorakit.export_gguf_lora: one adapter as llama.cpp's LoRA GGUF. The check is llama.cpp's own arithmetic written
out in float64: each base weight W of the base model's GGUF plus (alpha / r)·B·A from the adapter file (r read
from B, alpha from the file) equals the weight of the merged model's GGUF."""

from __future__ import annotations

import copy

import numpy as np
import pytest

import lorakit
from lorakit.export import ExportError, export_gguf, export_gguf_lora

ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


def apply_like_llama_cpp(base: dict[str, np.ndarray], adapter: dict[str, np.ndarray], alpha: float) -> dict:
    """W + alpha / r · B·A for every weight with `.lora_a` / `.lora_b` tensors (numpy layout: A (r, in), B (out, r))."""
    applied = dict(base)
    for name in base:
        a, b = adapter.get(f"{name}.lora_a"), adapter.get(f"{name}.lora_b")
        if a is not None:
            applied[name] = base[name] + alpha / b.shape[1] * (b @ a)
    return applied


def exported_pair(model, tokenizer, tmp_path, read_gguf, **lora_options):
    """(adapter file's metadata, its tensors, the base GGUF's tensors, the merged GGUF's tensors), all f32."""
    base = copy.deepcopy(model)
    lorakit.add_adapter(model, lorakit.LoraConfig(**{"r": 4, "alpha": 8, "target_modules": ADAPTED, **lora_options}))
    for param in (p for n, p in sorted(model.named_parameters()) if ".lora_" in n):
        param.data.normal_(0, 0.2)
    fields, adapter, _ = read_gguf(export_gguf_lora(model, tmp_path / "adapter.gguf"))
    merged = lorakit.merge_and_unload(model)
    _, base_tensors, _ = read_gguf(export_gguf(base, tokenizer, tmp_path / "base.gguf", type="f32"))
    _, merged_tensors, _ = read_gguf(export_gguf(merged, tokenizer, tmp_path / "merged.gguf", type="f32"))
    return fields, adapter, base_tensors, merged_tensors


@pytest.mark.parametrize(
    "options",
    [
        {},
        {"use_rslora": True, "rank_pattern": {"v_proj": 2}, "alpha_pattern": {"down_proj": 3.0}},
        {"init": "pissa"},
    ],
    ids=["plain", "rslora-rank-alpha-patterns", "pissa"],
)
def test_adapter_applied_as_llama_cpp_does_equals_the_merged_weights(
    block_llama, chat_tokenizer, tmp_path, read_gguf, options
):
    fields, adapter, base, merged = exported_pair(block_llama, chat_tokenizer, tmp_path, read_gguf, **options)
    assert (fields["general.type"], fields["adapter.type"], fields["general.architecture"]) == (
        "adapter",
        "lora",
        "llama",
    )
    applied = apply_like_llama_cpp(base, adapter, fields["adapter.lora.alpha"])
    assert applied.keys() == merged.keys()
    for name, value in merged.items():
        np.testing.assert_allclose(applied[name], value, atol=2e-6, rtol=0, err_msg=name)
    adapted_weights = {name.rsplit(".", 1)[0] for name in adapter}
    assert len(adapted_weights) == 2 * len(ADAPTED)  # every adapted matrix of both blocks, nothing else
    assert all(name.startswith("blk.") for name in adapted_weights)


def test_factor_shapes_are_llama_cpps(block_llama, chat_tokenizer, tmp_path, read_gguf):
    """A is stored (r, in) and B (out, r): ne [in, r] and [r, out], which llama.cpp checks against the weight."""
    _, adapter, base, _ = exported_pair(block_llama, chat_tokenizer, tmp_path, read_gguf)
    assert adapter["blk.0.attn_k.weight.lora_a"].shape == (4, 64)
    assert adapter["blk.0.attn_k.weight.lora_b"].shape == (32, 4)
    for name in {n.rsplit(".", 1)[0] for n in adapter}:
        out_features, in_features = base[name].shape
        assert adapter[f"{name}.lora_a"].shape[1] == in_features
        assert adapter[f"{name}.lora_b"].shape[0] == out_features


@pytest.mark.parametrize(
    ("options", "message"),
    [
        ({"use_dora": True}, "DoRA"),
        ({"modules_to_save": ["lm_head"]}, "modules_to_save"),
        ({"bias": "lora_only"}, "biases"),
        ({"target_modules": ["embed_tokens"]}, "linear layers, not Embedding"),
        ({"type": "q4_0"}, "written in f32, f16, bf16, q8_0, not 'q4_0'"),
    ],
    ids=["dora", "modules_to_save", "bias", "embedding", "q4_0"],
)
def test_what_a_lora_file_cannot_hold_is_refused_and_nothing_is_written(block_llama, tmp_path, options, message):
    gguf_type = options.pop("type", "f32")
    lorakit.add_adapter(block_llama, lorakit.LoraConfig(**{"r": 4, "target_modules": ["q_proj"], **options}))
    with pytest.raises(ExportError, match=message):
        export_gguf_lora(block_llama, tmp_path / "adapter.gguf", type=gguf_type)
    assert list(tmp_path.iterdir()) == []


def test_an_adapter_on_a_tied_output_head_is_refused(llama_tied, tmp_path):
    lorakit.add_adapter(llama_tied, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))
    with pytest.raises(ExportError, match="shares its weight with the token embedding"):
        export_gguf_lora(llama_tied, tmp_path / "adapter.gguf")
    assert list(tmp_path.iterdir()) == []
