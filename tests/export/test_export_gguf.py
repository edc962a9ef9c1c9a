"""lorakit.export_gguf: a merged model as one GGUF file, checked against transformers' own GGUF loader (logits and
tokenizer round trips), llama.cpp's q/k row permutation written out index by index, and the `gguf` reader."""

from __future__ import annotations

import copy

import gguf
import numpy as np
import pytest
import torch
from transformers import AutoModelForCausalLM, AutoTokenizer, LlamaConfig, LlamaForCausalLM

import lorakit
from lorakit.export import ExportError, export_gguf
from support.models import make_gpt2

EMBEDDINGS = ("model.embed_tokens.weight", "lm_head.weight")

# Largest |Δlogit| / max |logit| after the round trip through transformers' loader. Measured on this model (random
# weights plus a large random adapter): f32 0, f16 6.9e-4, bf16 6.4e-3, q8_0 2.9e-2, q4_0 0.31 (Frobenius: 0, 5.7e-4,
# 4.8e-3, 1.7e-2, 0.22). Quantized types are also checked exactly against the weights rounded by `gguf` itself.
FLOAT_TOLERANCE = {"f32": 1e-5, "f16": 2e-3, "bf16": 1.5e-2}
QUANTIZED_TOLERANCE = {"q8_0": 6e-2, "q4_0": 0.5}
STRINGS = [
    "The Vaults is a pub near Café Adriatic.",
    "name[Blue Spice], priceRange[more than £30] 1234",
    " ü <|im_end|>",
]


def load_back(path):
    return AutoModelForCausalLM.from_pretrained(path.parent, gguf_file=path.name, dtype=torch.float32).eval()


def relative_error(actual: torch.Tensor, expected: torch.Tensor) -> float:
    return ((actual - expected).abs().max() / expected.abs().max()).item()


def exported_logits(model, tokenizer, ids, path, gguf_type) -> torch.Tensor:
    export_gguf(model, tokenizer, path, type=gguf_type)
    with torch.no_grad():
        return load_back(path)(ids).logits


@pytest.mark.parametrize("gguf_type", list(FLOAT_TOLERANCE))
def test_merged_model_round_trips_through_transformers(adapted_llama, chat_tokenizer, prompt_ids, tmp_path, gguf_type):
    merged = lorakit.merge_and_unload(adapted_llama)
    with torch.no_grad():
        expected = merged(prompt_ids).logits
    actual = exported_logits(merged, chat_tokenizer, prompt_ids, tmp_path / "m.gguf", gguf_type)
    assert relative_error(actual, expected) <= FLOAT_TOLERANCE[gguf_type]


@pytest.mark.parametrize(("gguf_type", "matrices", "embeddings"), [("q8_0", "Q8_0", "Q8_0"), ("q4_0", "Q4_0", "Q8_0")])
def test_quantized_model_computes_with_the_weights_gguf_rounds(
    adapted_llama, chat_tokenizer, prompt_ids, tmp_path, gguf_type, matrices, embeddings
):
    """The file's model is the merged model with each matrix rounded by the `gguf` package's quantizer (the
    reference: quantize, then dequantize), so the logits match that to float precision; the rounding itself
    moves them by the type's error."""
    merged = lorakit.merge_and_unload(adapted_llama)
    rounded = copy.deepcopy(merged)
    with torch.no_grad():
        for name, param in rounded.named_parameters():
            if param.ndim == 2:
                qtype = gguf.GGMLQuantizationType[embeddings if name in EMBEDDINGS else matrices]
                values = gguf.quants.dequantize(gguf.quants.quantize(param.numpy(), qtype), qtype)
                param.copy_(torch.from_numpy(values.astype(np.float32)))
        reference, unrounded = rounded(prompt_ids).logits, merged(prompt_ids).logits
    actual = exported_logits(merged, chat_tokenizer, prompt_ids, tmp_path / "m.gguf", gguf_type)
    assert relative_error(actual, reference) <= 1e-5
    assert 1e-4 <= relative_error(actual, unrounded) <= QUANTIZED_TOLERANCE[gguf_type]


def test_q_and_k_rows_follow_llama_cpp_interleaved_rotary_order(block_llama, chat_tokenizer, tmp_path, read_gguf):
    """Row h·d + 2i + j of attn_q / attn_k is row h·d + j·d/2 + i of q_proj / k_proj (llama.cpp's permute);
    every other weight is stored as it is, a (out × in) matrix being ne = [in, out]."""
    _, tensors, types = read_gguf(export_gguf(block_llama, chat_tokenizer, tmp_path / "m.gguf", type="f32"))
    layer = block_llama.model.layers[1].self_attn
    for weight, heads, name in ((layer.q_proj.weight, 4, "attn_q"), (layer.k_proj.weight, 2, "attn_k")):
        stored = tensors[f"blk.1.{name}.weight"]
        d = weight.shape[0] // heads
        for h in range(heads):
            for i in range(d // 2):
                for j in range(2):
                    assert (stored[h * d + 2 * i + j] == weight[h * d + j * d // 2 + i].detach().double().numpy()).all()
    as_stored = {
        "blk.1.attn_v.weight": layer.v_proj.weight,
        "blk.0.ffn_gate.weight": block_llama.model.layers[0].mlp.gate_proj.weight,
        "output_norm.weight": block_llama.model.norm.weight,
    }
    for name, weight in as_stored.items():
        assert (tensors[name] == weight.detach().double().numpy()).all(), name
    assert set(types.values()) == {"F32"}
    assert len(tensors) == 2 + 1 + 2 * 9  # token_embd, output, output_norm; 7 matrices and 2 norms per block


def test_types_keep_norms_f32_and_embeddings_q8_0_under_q4_0(block_llama, chat_tokenizer, tmp_path, read_gguf):
    fields, _, types = read_gguf(export_gguf(block_llama, chat_tokenizer, tmp_path / "m.gguf", type="q4_0"))
    assert types["blk.0.attn_q.weight"] == types["blk.1.ffn_down.weight"] == "Q4_0"
    assert types["token_embd.weight"] == types["output.weight"] == "Q8_0"
    assert types["blk.0.attn_norm.weight"] == types["output_norm.weight"] == "F32"
    assert fields["general.file_type"] == 2  # llama.cpp's LLAMA_FTYPE_MOSTLY_Q4_0
    assert fields["general.quantization_version"] == 2


def test_rows_that_are_not_whole_blocks_fall_back_to_f16(chat_llama_dir, tmp_path, read_gguf):
    model = AutoModelForCausalLM.from_pretrained(chat_llama_dir)  # hidden 16, intermediate 32
    path = export_gguf(model, AutoTokenizer.from_pretrained(chat_llama_dir), tmp_path / "m.gguf", "q8_0")
    _, tensors, types = read_gguf(path)
    matrices = {name: value.shape[-1] for name, value in tensors.items() if value.ndim == 2}
    assert {name: types[name] for name in matrices} == {
        name: "Q8_0" if row % 32 == 0 else "F16" for name, row in matrices.items()
    }
    assert "F16" in types.values() and types["blk.0.ffn_down.weight"] == "Q8_0"


def test_metadata_holds_the_llama_hyperparameters_and_the_tokenizer(block_llama, chat_tokenizer, tmp_path, read_gguf):
    fields, _, _ = read_gguf(export_gguf(block_llama, chat_tokenizer, tmp_path / "m.gguf", type="f16"))
    config = block_llama.config
    assert fields["general.architecture"] == "llama" and fields["general.type"] == "model"
    assert fields["llama.block_count"] == config.num_hidden_layers
    assert fields["llama.embedding_length"] == config.hidden_size
    assert fields["llama.feed_forward_length"] == config.intermediate_size
    assert (fields["llama.attention.head_count"], fields["llama.attention.head_count_kv"]) == (4, 2)
    assert fields["llama.rope.dimension_count"] == 16
    assert fields["llama.rope.freq_base"] == 5000.0
    assert fields["llama.context_length"] == 128
    assert fields["llama.attention.layer_norm_rms_epsilon"] == pytest.approx(config.rms_norm_eps)
    assert fields["tokenizer.ggml.model"] == "gpt2" and fields["tokenizer.ggml.pre"] == "gpt2"
    assert fields["tokenizer.ggml.tokens"] == chat_tokenizer.convert_ids_to_tokens(list(range(len(chat_tokenizer))))
    assert fields["tokenizer.ggml.token_type"][:4] == [3, 3, 3, 3]  # <s> </s> <|im_start|> <|im_end|>: control
    assert set(fields["tokenizer.ggml.token_type"][4:]) == {1}
    assert fields["tokenizer.ggml.merges"][0] == "Ġ a"
    assert fields["tokenizer.ggml.bos_token_id"] == chat_tokenizer.bos_token_id
    assert fields["tokenizer.ggml.eos_token_id"] == chat_tokenizer.eos_token_id
    assert fields["tokenizer.ggml.add_bos_token"] is False
    assert fields["tokenizer.chat_template"] == chat_tokenizer.chat_template


def test_tokenizer_and_chat_template_round_trip(block_llama, chat_tokenizer, tmp_path):
    path = export_gguf(block_llama, chat_tokenizer, tmp_path / "m.gguf", type="f16")
    loaded = AutoTokenizer.from_pretrained(tmp_path, gguf_file=path.name)
    for text in STRINGS:
        assert loaded(text).input_ids == chat_tokenizer(text).input_ids, text
    messages = [{"role": "user", "content": STRINGS[0]}]
    assert loaded.apply_chat_template(messages, tokenize=False, add_generation_prompt=True) == (
        chat_tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
    )


def test_tied_output_head_is_left_to_token_embd(block_llama, chat_tokenizer, prompt_ids, tmp_path, read_gguf):
    config = LlamaConfig(**{**block_llama.config.to_dict(), "tie_word_embeddings": True})
    torch.manual_seed(1)
    tied = LlamaForCausalLM(config).eval()
    path = export_gguf(tied, chat_tokenizer, tmp_path / "m.gguf", type="f32")
    assert "output.weight" not in read_gguf(path)[1]
    with torch.no_grad():
        assert relative_error(load_back(path)(prompt_ids).logits, tied(prompt_ids).logits) <= 1e-5


def test_quantized_base_is_refused_unless_dequantized(block_llama, chat_tokenizer, prompt_ids, tmp_path):
    lorakit.quantize(block_llama, "int8")
    with pytest.raises(ExportError, match="dequantize=True"):
        export_gguf(block_llama, chat_tokenizer, tmp_path / "m.gguf", type="f32")
    assert list(tmp_path.iterdir()) == []
    path = export_gguf(block_llama, chat_tokenizer, tmp_path / "m.gguf", type="f32", dequantize=True)
    with torch.no_grad():  # the decoded weights are what the quantized model computes with
        assert relative_error(load_back(path)(prompt_ids).logits, block_llama(prompt_ids).logits) <= 1e-5


@pytest.mark.parametrize(
    ("build", "message"),
    [
        (lambda llama: make_gpt2(), "architectures \\['llama'\\], not 'gpt2'"),
        (lambda llama: llama, "still has LoRA layers"),
        (lambda llama: LlamaForCausalLM(LlamaConfig(**{**llama.config.to_dict(), "attention_bias": True})), "biases"),
    ],
    ids=["gpt2", "unmerged", "bias"],
)
def test_what_cannot_be_exported_is_refused_and_nothing_is_written(
    adapted_llama, chat_tokenizer, tmp_path, build, message
):
    model = build(copy.deepcopy(adapted_llama))
    with pytest.raises(ExportError, match=message):
        export_gguf(model, chat_tokenizer, tmp_path / "m.gguf")
    with pytest.raises(ExportError, match="unknown GGUF type 'q4_k'"):
        export_gguf(lorakit.merge_and_unload(adapted_llama), chat_tokenizer, tmp_path / "m.gguf", type="q4_k")
    assert list(tmp_path.iterdir()) == []
