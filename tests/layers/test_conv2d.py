"""LoRA on nn.Conv2d: A is a conv with the base kernel geometry, B a 1×1 conv. Checked in float64 against
F.conv2d with the explicitly composed kernel K[o, i] = Σ_r B[o, r]·A[r, i], over several geometries. The checks
every layer type shares (init, gradients, ranks) are in test_contract.py."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F
from torch import nn

import lorakit
from lorakit.layers import LoraConv2d
from support.models import Holder, adapt_layer, fill_

C_IN, C_OUT = 3, 5

GEOMETRIES = [  # kernel, stride, padding, dilation
    pytest.param((3, 3), 1, 1, 1, id="3x3-pad"),
    pytest.param((3, 3), 2, 0, 1, id="3x3-stride2"),
    pytest.param((1, 1), 1, 0, 1, id="1x1"),
    pytest.param((3, 2), (2, 1), (1, 0), 1, id="3x2-mixed"),
    pytest.param((3, 3), 1, 2, 2, id="3x3-dilated"),
    pytest.param((3, 3), 1, "same", 1, id="3x3-same"),
]


def _base(kernel, stride, padding, dilation, dtype=torch.float64) -> nn.Conv2d:
    torch.manual_seed(0)
    return nn.Conv2d(C_IN, C_OUT, kernel, stride=stride, padding=padding, dilation=dilation).to(dtype)


def _x(dtype=torch.float64) -> torch.Tensor:
    return torch.randn(2, C_IN, 9, 8, generator=torch.Generator().manual_seed(5), dtype=dtype)


def _randomized(holder) -> tuple[torch.Tensor, torch.Tensor]:
    layer = holder.layer
    """Puts random values in A and B (B ≠ 0); returns them as float64 for the reference formula."""
    a = fill_(layer.lora_A["default"].weight, 1)
    b = fill_(layer.lora_B["default"].weight, 2)
    return a.detach().double(), b.detach().double()


def _composed_kernel(a: torch.Tensor, b: torch.Tensor) -> torch.Tensor:
    """B (out, r, 1, 1) after A (r, in, kh, kw) is one conv whose kernel mixes A's r kernels by B."""
    r, c_in, kh, kw = a.shape
    kernel = torch.zeros(b.shape[0], c_in, kh, kw, dtype=a.dtype)
    for o in range(b.shape[0]):
        for k in range(r):
            kernel[o] += b[o, k, 0, 0] * a[k]
    return kernel


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
def test_output_matches_float64_formula(kernel, stride, padding, dilation):
    base = _base(kernel, stride, padding, dilation)
    w0, b0 = base.weight.detach().clone(), base.bias.detach().clone()
    holder = adapt_layer(base, r=2, alpha=3).eval()
    assert isinstance(holder.layer, LoraConv2d)
    a, b = _randomized(holder)
    x = _x()
    geometry = {"stride": stride, "padding": padding, "dilation": dilation}
    expected = F.conv2d(x, w0, b0, **geometry) + 1.5 * F.conv2d(x, _composed_kernel(a, b), None, **geometry)
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12)


@pytest.mark.parametrize(("kernel", "stride", "padding", "dilation"), GEOMETRIES)
def test_merge_adds_the_composed_kernel(kernel, stride, padding, dilation):
    base = _base(kernel, stride, padding, dilation)
    w0 = base.weight.detach().clone()
    holder = adapt_layer(base, r=2, alpha=3).eval()
    a, b = _randomized(holder)
    lorakit.merge(holder)
    torch.testing.assert_close(base.weight.detach(), w0 + 1.5 * _composed_kernel(a, b), rtol=0, atol=1e-12)
    lorakit.unmerge(holder)
    torch.testing.assert_close(base.weight.detach(), w0, rtol=0, atol=1e-12)


def test_adapter_shapes():
    holder = adapt_layer(_base((3, 2), 1, 0, 1), r=4)
    assert holder.layer.lora_A["default"].weight.shape == (4, C_IN, 3, 2)
    assert holder.layer.lora_B["default"].weight.shape == (C_OUT, 4, 1, 1)


def test_trainable_parameter_count():
    # A is r × (in·kh·kw), B is out × r: r·(d_in + d_out) with d_in = in·kh·kw.
    holder = adapt_layer(_base((3, 2), 1, 0, 1), r=4)
    assert lorakit.trainable_parameters(holder)[0] == 4 * (C_IN * 3 * 2 + C_OUT)


def test_grouped_convolution_is_refused(unchanged):
    holder = Holder(nn.Conv2d(4, 4, 3, groups=2))
    with unchanged(holder), pytest.raises(ValueError, match="groups=2"):
        lorakit.add_adapter(holder, lorakit.LoraConfig(r=2, target_modules=["layer"]))


def test_convnet_model_adapts_both_convolutions(convnet, images):
    expected = convnet(images)
    lorakit.add_adapter(convnet, lorakit.LoraConfig(r=2, target_modules=["conv1", "conv2"]))
    assert isinstance(convnet.conv1, LoraConv2d) and isinstance(convnet.conv2, LoraConv2d)
    assert torch.equal(convnet(images), expected)
    assert lorakit.trainable_parameters(convnet)[0] == 2 * (3 * 9 + 8) + 2 * (8 * 9 + 8)
