"""LoRA on nn.Embedding: y[t] = W0[t] + (α/r)·B·A[:, t] in float64. The checks every layer type shares (init,
the merge of (B·A)ᵀ into the table, gradients, ranks) are in test_contract.py."""

from __future__ import annotations

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraEmbedding
from support.models import adapt_layer, fill_

VOCAB, DIM = 20, 6


def _base(dtype: torch.dtype = torch.float64) -> nn.Embedding:
    torch.manual_seed(0)
    return nn.Embedding(VOCAB, DIM).to(dtype)


def _ids() -> torch.Tensor:
    return torch.randint(0, VOCAB, (3, 7), generator=torch.Generator().manual_seed(5))


def _randomized(holder) -> tuple[torch.Tensor, torch.Tensor]:
    layer = holder.layer
    """Puts random values in A and B (B ≠ 0); returns them as float64 for the reference formula."""
    a = fill_(layer.lora_embedding_A["default"], 1)
    b = fill_(layer.lora_embedding_B["default"], 2)
    return a.detach().double(), b.detach().double()


def test_wraps_embedding_with_peft_named_parameters():
    holder = adapt_layer(_base(), r=3)
    assert isinstance(holder.layer, LoraEmbedding)
    assert holder.layer.lora_embedding_A["default"].shape == (3, VOCAB)
    assert holder.layer.lora_embedding_B["default"].shape == (DIM, 3)


def test_adapter_follows_the_base_dtype():
    holder = adapt_layer(_base(torch.float64), r=3)
    assert holder.layer.lora_embedding_A["default"].dtype == torch.float64
    assert holder.layer.lora_embedding_B["default"].dtype == torch.float64


@pytest.mark.parametrize(("r", "alpha"), [(1, 1.0), (4, 6.0)])
def test_output_matches_float64_formula(r, alpha):
    base = _base()
    w0 = base.weight.detach().clone()
    holder = adapt_layer(base, r=r, alpha=alpha).eval()
    a, b = _randomized(holder)
    ids = _ids()
    # Row t of the adapted table: W0[t] + scaling · B · (column t of A).
    expected = w0[ids] + (alpha / r) * (a.T[ids] @ b.T)
    torch.testing.assert_close(holder(ids), expected, rtol=0, atol=1e-12)


def test_dropout_does_not_apply_to_token_ids():
    base = _base()
    holder = adapt_layer(base, r=2, alpha=2, dropout=0.5).train()
    a, b = _randomized(holder)
    ids = _ids()
    expected = base.weight.detach()[ids] + a.T[ids] @ b.T
    torch.testing.assert_close(holder(ids), expected, rtol=0, atol=1e-12)


def test_trainable_parameter_count_is_r_times_vocab_plus_dim():
    holder = adapt_layer(_base(), r=5)
    assert lorakit.trainable_parameters(holder)[0] == 5 * (VOCAB + DIM)
