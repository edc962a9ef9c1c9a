"""LoRA on GPT-2's Conv1D, whose weight is stored (in, out): y = x·W0 + b + (α/r)·x·Aᵀ·Bᵀ in float64. The
checks every layer type shares (init, the transposed merge, gradients, ranks) are in test_contract.py."""

from __future__ import annotations

import pytest
import torch
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit.layers import LoraConv1D
from support.models import adapt_layer, fill_

IN, OUT = 12, 18


def _base(dtype: torch.dtype = torch.float64) -> Conv1D:
    torch.manual_seed(0)
    layer = Conv1D(OUT, IN).to(dtype)  # Conv1D(nf=out, nx=in)
    fill_(layer.bias, 9, std=0.3)  # transformers initialises the bias to zero; make it count
    return layer


def _x(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 5, IN, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _randomized(holder) -> tuple[torch.Tensor, torch.Tensor]:
    layer = holder.layer
    """Puts random values in A and B (B ≠ 0); returns them as float64 for the reference formula."""
    a = fill_(layer.lora_A["default"].weight, 1)
    b = fill_(layer.lora_B["default"].weight, 2)
    return a.detach().double(), b.detach().double()


def test_wraps_conv1d_with_in_out_read_from_the_transposed_weight():
    base = _base()
    holder = adapt_layer(base, r=3)
    assert isinstance(holder.layer, LoraConv1D)
    assert holder.layer.lora_A["default"].weight.shape == (3, IN)
    assert holder.layer.lora_B["default"].weight.shape == (OUT, 3)
    assert holder.layer.nf == OUT  # GPT-2 code reads attributes of its Conv1D
    assert lorakit.adapter_config(holder, "default").fan_in_fan_out is True


@pytest.mark.parametrize(("r", "alpha"), [(1, 2.0), (4, 3.0)])
def test_output_matches_float64_formula(r, alpha):
    base = _base()
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    assert w0.shape == (IN, OUT)
    holder = adapt_layer(base, r=r, alpha=alpha).eval()
    a, b = _randomized(holder)
    x = _x()
    expected = x @ w0 + b0 + (alpha / r) * ((x @ a.T) @ b.T)
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12)


def test_trainable_parameter_count_is_r_times_in_plus_out():
    holder = adapt_layer(_base(), r=5)
    assert lorakit.trainable_parameters(holder)[0] == 5 * (IN + OUT)
