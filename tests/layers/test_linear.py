"""LoRA on nn.Linear against the formula y = W0·x + b + (α/r)·B·A·x, written out in float64. The checks every
layer type shares (init, merge, gradients, ranks) are in test_contract.py."""

from __future__ import annotations

import math

import pytest
import torch
from torch import nn

import lorakit
from lorakit.layers import LoraLinear
from support.models import adapt_layer, fill_

IN, OUT = 12, 10


def _base(dtype: torch.dtype = torch.float64, bias: bool = True) -> nn.Linear:
    torch.manual_seed(0)
    return nn.Linear(IN, OUT, bias=bias).to(dtype)


def _x(dtype: torch.dtype = torch.float64) -> torch.Tensor:
    return torch.randn(2, 3, IN, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _randomized(holder) -> tuple[torch.Tensor, torch.Tensor]:
    layer = holder.layer
    """Puts random values in A and B (B ≠ 0); returns them as float64 for the reference formula."""
    a = fill_(layer.lora_A["default"].weight, 1)
    b = fill_(layer.lora_B["default"].weight, 2)
    return a.detach().double(), b.detach().double()


def test_wraps_linear_and_keeps_the_base_layer():
    base = _base()
    holder = adapt_layer(base, r=3)
    assert isinstance(holder.layer, LoraLinear)
    assert holder.layer.base_layer is base
    assert holder.layer.lora_A["default"].weight.shape == (3, IN)
    assert holder.layer.lora_B["default"].weight.shape == (OUT, 3)
    assert holder.layer.lora_A["default"].weight.dtype == torch.float64


@pytest.mark.parametrize("bias", [True, False])
@pytest.mark.parametrize(("r", "alpha", "rslora"), [(1, 1.0, False), (3, 7.0, False), (4, 6.0, True)])
def test_output_matches_float64_formula(bias, r, alpha, rslora):
    base = _base(bias=bias)
    w0 = base.weight.detach().clone()
    b0 = base.bias.detach().clone() if bias else torch.zeros(OUT, dtype=torch.float64)
    holder = adapt_layer(base, r=r, alpha=alpha, use_rslora=rslora).eval()
    a, b = _randomized(holder)
    x = _x()
    scale = alpha / math.sqrt(r) if rslora else alpha / r

    expected = x @ w0.T + b0 + scale * ((x @ a.T) @ b.T)
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12)


def test_kaiming_init_of_a_and_zero_b():
    holder = adapt_layer(nn.Linear(256, 64), r=16)
    a = holder.layer.lora_A["default"].weight
    assert torch.count_nonzero(holder.layer.lora_B["default"].weight) == 0
    bound = 1 / math.sqrt(256)  # kaiming_uniform(a=√5) on fan_in 256, as nn.Linear's own init
    assert a.abs().max() <= bound
    assert a.abs().max() > 0.9 * bound
    assert a.std().item() == pytest.approx(bound / math.sqrt(3), rel=0.1)


def test_gaussian_init_of_a_has_std_one_over_r():
    holder = adapt_layer(nn.Linear(256, 64), r=8, init="gaussian")
    a = holder.layer.lora_A["default"].weight
    assert torch.count_nonzero(holder.layer.lora_B["default"].weight) == 0
    assert a.std().item() == pytest.approx(1 / 8, rel=0.1)
    assert a.mean().abs().item() < 0.02


def test_trainable_parameter_count_is_r_times_in_plus_out():
    holder = adapt_layer(_base(), r=5)
    trainable, total = lorakit.trainable_parameters(holder)
    assert trainable == 5 * (IN + OUT)
    assert total == IN * OUT + OUT + 5 * (IN + OUT)


def test_dropout_acts_on_the_low_rank_path_in_training_only():
    base = _base()
    holder = adapt_layer(base, r=4, alpha=8, dropout=0.5)
    a, b = _randomized(holder)
    x = _x()
    holder.train()
    torch.manual_seed(0)
    first = holder(x)
    second = holder(x)
    assert not torch.allclose(first, second)
    # The base path is never dropped: what varies between calls is a masked LoRA input only.
    with torch.no_grad():
        lora_part = first - base(x)
    assert torch.linalg.matrix_rank(lora_part.reshape(-1, OUT)) <= 4
    holder.eval()
    expected = base(x) + 2.0 * ((x @ a.T) @ b.T)
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12)


def test_reads_of_base_attributes_pass_through():
    holder = adapt_layer(_base(), r=2)
    assert (holder.layer.in_features, holder.layer.out_features) == (IN, OUT)
    assert holder.layer.weight is holder.layer.base_layer.weight
    assert holder.layer.bias is holder.layer.base_layer.bias
