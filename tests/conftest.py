"""Fixtures for the core test suite: tiny models (built once per session, deep-copied per test so tests
may mutate freely), fixed inputs, and `unchanged`, which proves a failed call left a model as it was."""

from __future__ import annotations

import copy
from collections.abc import Callable, Iterator
from contextlib import AbstractContextManager, contextmanager
from pathlib import Path

import pytest
import torch
from torch import nn

from support.files import save_tiny_llama
from support.models import (
    VOCAB,
    assert_same_snapshot,
    make_bert,
    make_convnet,
    make_gpt2,
    make_llama,
    snapshot,
)


def pytest_collection_modifyitems(config: pytest.Config, items: list[pytest.Item]) -> None:
    """Tests marked `gpu` need CUDA: where there is none (CI, this repository's CPU machines) they are skipped."""
    if torch.cuda.is_available():
        return
    skip = pytest.mark.skip(reason="needs CUDA (torch.cuda.is_available() is false)")
    for item in items:
        if item.get_closest_marker("gpu") is not None:
            item.add_marker(skip)


@pytest.fixture(scope="session")
def _bases() -> dict[str, nn.Module]:
    return {
        "llama": make_llama(),
        "llama_bias": make_llama(attention_bias=True),
        "llama_tied": make_llama(tied=True),
        "gpt2": make_gpt2(),
        "bert": make_bert(),
        "convnet": make_convnet(),
    }


@pytest.fixture
def base_copy(_bases) -> Callable[[str], nn.Module]:
    """A fresh, untouched copy of a session base model by key, e.g. as a reference beside the model under test."""
    return lambda key: copy.deepcopy(_bases[key])


@pytest.fixture
def llama(base_copy) -> nn.Module:
    return base_copy("llama")


@pytest.fixture
def llama_bias(base_copy) -> nn.Module:
    """Llama with biases on the attention projections, so the bias modes have something to train."""
    return base_copy("llama_bias")


@pytest.fixture
def llama_tied(base_copy) -> nn.Module:
    """Llama whose lm_head shares its weight with embed_tokens."""
    return base_copy("llama_tied")


@pytest.fixture
def gpt2(base_copy) -> nn.Module:
    return base_copy("gpt2")


@pytest.fixture
def bert(base_copy) -> nn.Module:
    return base_copy("bert")


@pytest.fixture
def convnet(base_copy) -> nn.Module:
    return base_copy("convnet")


@pytest.fixture(scope="session")
def chat_llama_dir(tmp_path_factory) -> Path:
    """A tiny random llama with a chat template, saved as a pretrained folder once per session (read-only)."""
    torch.manual_seed(0)
    return save_tiny_llama(tmp_path_factory.mktemp("chat-llama"), chat=True)


@pytest.fixture
def input_ids() -> torch.Tensor:
    generator = torch.Generator().manual_seed(1)
    return torch.randint(3, VOCAB, (2, 7), generator=generator)


@pytest.fixture
def images() -> torch.Tensor:
    generator = torch.Generator().manual_seed(2)
    return torch.randn(2, 3, 8, 8, generator=generator)


@pytest.fixture
def unchanged() -> Callable[[nn.Module], AbstractContextManager[None]]:
    """`with unchanged(model), pytest.raises(...): bad_call(model)` asserts the failure changed nothing."""

    @contextmanager
    def check(model: nn.Module) -> Iterator[None]:
        before = snapshot(model)
        yield
        assert_same_snapshot(before, snapshot(model))

    return check
