"""DoRA (`use_dora=True`): the layer against the formula written out in float64, the magnitude's norm
convention (one norm per output feature, as PEFT's `linalg.norm(W, dim=1)`), PEFT's outputs for the same
weights in both directions, exact merge/unmerge, gradients with the norm treated as a constant, and the
layer types that refuse it."""

from __future__ import annotations

import copy

import pytest
import torch
import torch.nn.functional as F
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from safetensors.torch import load_file
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig
from support.models import Holder, fill_, randomize_trainable

IN, OUT = 6, 5


def _layer(kind: str) -> nn.Module:
    torch.manual_seed(0)
    if kind == "linear":
        return nn.Linear(IN, OUT)
    layer = Conv1D(OUT, IN)  # weight stored (in, out)
    nn.init.normal_(layer.weight, std=0.5)
    nn.init.normal_(layer.bias, std=0.1)
    return layer


def _w_out_in(layer: nn.Module) -> torch.Tensor:
    return layer.weight.T if isinstance(layer, Conv1D) else layer.weight


def _dora_holder(kind: str, r: int = 2, alpha: float = 3.0, **extra) -> Holder:
    holder = Holder(_layer(kind)).double()
    lorakit.add_adapter(holder, LoraConfig(r=r, alpha=alpha, target_modules=["layer"], use_dora=True, **extra))
    layer = holder.layer
    fill_(layer.lora_A["default"].weight, 1)
    fill_(layer.lora_B["default"].weight, 2)
    with torch.no_grad():
        noise = torch.rand(OUT, generator=torch.Generator().manual_seed(3), dtype=torch.float64)
        layer.lora_magnitude_vector["default"].mul_(1 + 0.3 * noise)  # m away from ‖W0‖
    return holder.eval()


def _reference(holder: Holder, x: torch.Tensor, scaling: float) -> torch.Tensor:
    """y = x·W'ᵀ + b with W' = m ⊙ (W0 + s·B·A) / ‖W0 + s·B·A‖ (row norms), all in float64."""
    layer = holder.layer
    w0 = _w_out_in(layer.base_layer).detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    m = layer.lora_magnitude_vector["default"].detach()
    w = w0 + scaling * b @ a
    w_new = (m / torch.linalg.norm(w, dim=1))[:, None] * w
    return x @ w_new.T + layer.base_layer.bias.detach()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_output_matches_the_float64_formula(kind):
    holder = _dora_holder(kind)
    x = torch.randn(4, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(5))
    torch.testing.assert_close(holder(x), _reference(holder, x, 3.0 / 2), rtol=0, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_magnitude_starts_at_the_norm_of_each_output_row(kind):
    layer = _layer(kind)
    reference = copy.deepcopy(layer)
    holder = Holder(layer)
    lorakit.add_adapter(holder, LoraConfig(r=2, target_modules=["layer"], use_dora=True))
    magnitude = holder.layer.lora_magnitude_vector["default"]
    assert magnitude.shape == (OUT,) and magnitude.requires_grad
    # PEFT's convention: W in (out, in) layout, norm over dim=1 -> one value per output feature.
    torch.testing.assert_close(magnitude, torch.linalg.norm(_w_out_in(reference).detach(), dim=1))
    x = torch.randn(3, IN)
    assert torch.equal(holder(x), reference(x))  # B = 0 and m = ‖W0‖: exactly the base


def test_dropout_in_training_follows_pefts_formula():
    """With dropout active, PEFT feeds the dropped-out input to the whole DoRA term:
    y = W0·x + b + (f − 1)·W0·d(x) + f·s·B·A·d(x), f = m / ‖W0 + s·B·A‖."""
    holder = _dora_holder("linear", dropout=0.5).train()
    layer = holder.layer
    x = torch.randn(8, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(6))
    torch.manual_seed(11)
    actual = holder(x)
    torch.manual_seed(11)
    dropped = F.dropout(x, 0.5, training=True)
    w0, bias = layer.base_layer.weight.detach(), layer.base_layer.bias.detach()
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    s = 3.0 / 2
    f = layer.lora_magnitude_vector["default"].detach() / torch.linalg.norm(w0 + s * b @ a, dim=1)
    expected = x @ w0.T + bias + (f - 1) * (dropped @ w0.T) + f * s * (dropped @ a.T @ b.T)
    torch.testing.assert_close(actual, expected, rtol=0, atol=1e-12)


def test_gradients_treat_the_norm_as_a_constant():
    holder = _dora_holder("linear")
    layer = holder.layer
    x = torch.randn(4, IN, dtype=torch.float64, generator=torch.Generator().manual_seed(7))
    holder(x).square().sum().backward()

    a = layer.lora_A["default"].weight.detach().clone().requires_grad_(True)
    b = layer.lora_B["default"].weight.detach().clone().requires_grad_(True)
    m = layer.lora_magnitude_vector["default"].detach().clone().requires_grad_(True)
    w0, s = layer.base_layer.weight.detach(), 3.0 / 2
    w = w0 + s * b @ a
    norm = torch.linalg.norm(w, dim=1).detach()
    (x @ ((m / norm)[:, None] * w).T + layer.base_layer.bias.detach()).square().sum().backward()
    for param, ref in (
        (layer.lora_A["default"].weight, a),
        (layer.lora_B["default"].weight, b),
        (layer.lora_magnitude_vector["default"], m),
    ):
        torch.testing.assert_close(param.grad, ref.grad, rtol=1e-10, atol=1e-12)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_merge_equals_unmerged_and_unmerge_restores(kind):
    holder = _dora_holder(kind)
    x = torch.randn(4, IN, dtype=torch.float64)
    before = _w_out_in(holder.layer.base_layer).detach().clone()
    unmerged = holder(x)
    lorakit.merge(holder)
    torch.testing.assert_close(holder(x), unmerged, rtol=0, atol=1e-12)
    lorakit.unmerge(holder)
    torch.testing.assert_close(_w_out_in(holder.layer.base_layer).detach(), before, rtol=0, atol=1e-12)
    torch.testing.assert_close(holder(x), unmerged, rtol=0, atol=1e-12)


def test_several_adapters_and_partial_merges_agree(base_copy, input_ids):
    """Two DoRA adapters and a plain one active together; merging them one at a time changes nothing."""
    model = base_copy("llama")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"], use_dora=True), "a")
    lorakit.add_adapter(model, LoraConfig(r=3, alpha=5, target_modules=["q_proj"], use_dora=True), "b")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "o_proj"]), "c")
    lorakit.set_adapter(model, ["a", "b", "c"])
    randomize_trainable(model, std=0.2)
    expected = model(input_ids).logits
    lorakit.merge(model, ["b"])
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)  # "b" merged, a and c not
    lorakit.merge(model, ["a", "c"])
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)
    with lorakit.disable_adapters(model):
        torch.testing.assert_close(model(input_ids).logits, base_copy("llama")(input_ids).logits, rtol=0, atol=1e-5)
    lorakit.unmerge(model)
    reference = dict(base_copy("llama").named_parameters())
    for path, layer in lorakit.inject.lora_layers(model):
        torch.testing.assert_close(layer.base_layer.weight, reference[f"{path}.weight"], rtol=0, atol=1e-5)


# -- PEFT -----------------------------------------------------------------------------------------
CASES = {
    "llama": ("llama", dict(r=2, alpha=4, target_modules=["q_proj", "v_proj", "down_proj"])),
    "llama-rslora-r8": ("llama", dict(r=8, alpha=4, target_modules=["q_proj", "o_proj"], use_rslora=True)),
    "gpt2": ("gpt2", dict(r=2, alpha=3, target_modules=["c_attn", "mlp.c_proj"])),
}


def _peft_config(base_name: str, kwargs: dict) -> PeftLoraConfig:
    return PeftLoraConfig(
        r=kwargs["r"],
        lora_alpha=kwargs["alpha"],
        target_modules=kwargs["target_modules"],
        use_dora=True,
        use_rslora=kwargs.get("use_rslora", False),
        fan_in_fan_out=base_name == "gpt2",
    )


@pytest.mark.parametrize("case", CASES)
def test_lorakit_dora_loads_in_peft(case, base_copy, input_ids, tmp_path):
    base_name, kwargs = CASES[case]
    model = base_copy(base_name)
    lorakit.add_adapter(model, LoraConfig(**kwargs, use_dora=True))
    randomize_trainable(model, std=0.2)
    with torch.no_grad():  # magnitudes away from their initial norms
        for _, layer in lorakit.inject.lora_layers(model):
            layer.lora_magnitude_vector["default"].mul_(1.5)
    expected = model(input_ids).logits
    assert not torch.allclose(expected, base_copy(base_name)(input_ids).logits, atol=1e-3)
    lorakit.save_adapter(model, tmp_path)
    keys = load_file(tmp_path / "adapter_model.safetensors")
    magnitudes = [k for k in keys if k.endswith(".lora_magnitude_vector")]  # PEFT's key, no ".weight"
    assert len(magnitudes) == len(list(lorakit.inject.lora_layers(model)))

    peft_model = PeftModel.from_pretrained(base_copy(base_name), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=0, atol=1e-6)
    ours = lorakit.merge_and_unload(model)
    theirs = peft_model.merge_and_unload()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


@pytest.mark.parametrize("case", CASES)
def test_peft_dora_loads_in_lorakit(case, base_copy, input_ids, tmp_path):
    base_name, kwargs = CASES[case]
    peft_model = get_peft_model(base_copy(base_name), _peft_config(base_name, kwargs))
    randomize_trainable(peft_model, std=0.2)
    with torch.no_grad():
        for name, param in peft_model.named_parameters():
            if "lora_magnitude_vector" in name:
                param.mul_(0.7)
    peft_model.eval()
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)

    model = base_copy(base_name)
    lorakit.load_adapter(model, tmp_path)
    assert lorakit.adapter_config(model, "default").use_dora
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-6)
    lorakit.save_adapter(model, tmp_path / "again")  # and back
    again = PeftModel.from_pretrained(base_copy(base_name), tmp_path / "again").eval()
    torch.testing.assert_close(again(input_ids).logits, expected, rtol=0, atol=1e-6)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize(("base_name", "target"), [("llama", "embed_tokens"), ("convnet", "conv1")])
def test_dora_on_embedding_or_conv2d_is_refused(base_name, target, base_copy, unchanged):
    model = base_copy(base_name)
    with unchanged(model), pytest.raises(ValueError, match=r"DoRA .* not for (Embedding|Conv2d)"):
        lorakit.add_adapter(
            model, LoraConfig(r=2, target_modules=["q_proj" if base_name == "llama" else "head", target], use_dora=True)
        )


def test_a_file_without_magnitudes_is_refused(base_copy, unchanged, tmp_path):
    model = base_copy("llama")
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"]))
    lorakit.save_adapter(model, tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"use_dora": false', '"use_dora": true'))
    fresh = base_copy("llama")
    with unchanged(fresh), pytest.raises(lorakit.AdapterFileError, match="lora_magnitude_vector"):
        lorakit.load_adapter(fresh, tmp_path)
