"""Fixtures for the GGUF export tests: a tiny Llama whose matrices are whole q8_0 / q4_0 blocks (hidden 64, 4 heads
of 16, 2 KV heads, so q and k are permuted differently), its byte-level BPE chat tokenizer, an adapter on it, and a
reader that gives every GGUF tensor back as float64 values through the `gguf` package's own dequantizer."""

from __future__ import annotations

import copy
from collections.abc import Callable
from pathlib import Path

import gguf
import numpy as np
import pytest
import torch
from transformers import LlamaConfig, LlamaForCausalLM

import lorakit
from support.files import tiny_tokenizer
from support.models import randomize_lora

ADAPTED = ["q_proj", "k_proj", "v_proj", "o_proj", "gate_proj", "down_proj"]


@pytest.fixture(scope="session")
def chat_tokenizer():
    return tiny_tokenizer(chat=True)


@pytest.fixture(scope="session")
def _block_llama(chat_tokenizer) -> LlamaForCausalLM:
    config = LlamaConfig(
        vocab_size=len(chat_tokenizer),
        hidden_size=64,
        intermediate_size=128,
        num_hidden_layers=2,
        num_attention_heads=4,
        num_key_value_heads=2,
        max_position_embeddings=128,
        rope_theta=5000.0,
        bos_token_id=chat_tokenizer.bos_token_id,
        eos_token_id=chat_tokenizer.eos_token_id,
    )
    torch.manual_seed(0)
    return LlamaForCausalLM(config).eval()


@pytest.fixture
def block_llama(_block_llama) -> LlamaForCausalLM:
    """A fresh copy of the tiny Llama (tests may change it)."""
    return copy.deepcopy(_block_llama)


@pytest.fixture
def adapted_llama(block_llama) -> LlamaForCausalLM:
    """The tiny Llama with a random (B ≠ 0) r=4 adapter "default" on the attention and two MLP projections."""
    lorakit.add_adapter(block_llama, lorakit.LoraConfig(r=4, alpha=8, target_modules=ADAPTED))
    randomize_lora(block_llama, std=0.2)
    return block_llama


@pytest.fixture
def prompt_ids(chat_tokenizer) -> torch.Tensor:
    text = "name[The Vaults], eatType[pub] near Café Adriatic, 5 out of 5"
    return chat_tokenizer([text], return_tensors="pt").input_ids


@pytest.fixture(scope="session")
def read_gguf() -> Callable[[Path], tuple[dict, dict[str, np.ndarray], dict[str, str]]]:
    """path → (metadata by key, tensors by name as float64 arrays in the file's numpy layout, type name by tensor)."""

    def read(path: Path):
        reader = gguf.GGUFReader(path)
        fields = {key: field.contents() for key, field in reader.fields.items()}
        tensors, types = {}, {}
        for tensor in reader.tensors:
            values = gguf.quants.dequantize(np.array(tensor.data), tensor.tensor_type)
            tensors[tensor.name] = np.asarray(values, dtype=np.float64).reshape(tuple(reversed(tensor.shape.tolist())))
            types[tensor.name] = tensor.tensor_type.name
        return fields, tensors, types

    return read
