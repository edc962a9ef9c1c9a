"""PiSSA and OLoRA initialisation: the factors against float64 SVD / QR, the model at init equal to the base,
the trained adapter against W_res + s·B·A, saving (as PEFT does, and converted to a rank-2r plain LoRA of the
original base) with PEFT's outputs in both directions, and the base weights never touched."""

from __future__ import annotations

import json
import math

import pytest
import torch
from peft import LoraConfig as PeftLoraConfig
from peft import PeftModel, get_peft_model
from torch import nn
from transformers.pytorch_utils import Conv1D

import lorakit
from lorakit import LoraConfig
from lorakit.inject import lora_layers
from support.models import Holder, randomize_trainable


def _holder(kind: str, init: str, r: int = 3, alpha: float = 6.0, **extra) -> Holder:
    torch.manual_seed(0)
    layer = nn.Linear(7, 5) if kind == "linear" else Conv1D(5, 7)
    if kind == "conv1d":
        nn.init.normal_(layer.weight, std=0.3)
    holder = Holder(layer).double()
    lorakit.add_adapter(holder, LoraConfig(r=r, alpha=alpha, target_modules=["layer"], init=init, **extra))
    return holder.eval()


def _w(layer: nn.Module) -> torch.Tensor:
    return (layer.weight.T if isinstance(layer, Conv1D) else layer.weight).detach()


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_pissa_factors_are_the_principal_singular_part(kind):
    holder = _holder(kind, "pissa")
    layer, s = holder.layer, 6.0 / 3
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    u, sv, vh = torch.linalg.svd(_w(layer.base_layer), full_matrices=False)
    torch.testing.assert_close(s * b @ a, u[:, :3] @ torch.diag(sv[:3]) @ vh[:3], rtol=0, atol=1e-6)
    # B = U_r·√(S_r/s), A = √(S_r/s)·V_rᵀ: orthogonal columns / rows carrying √(S_r/s) each.
    torch.testing.assert_close(b.T @ b, torch.diag(sv[:3] / s), rtol=0, atol=1e-6)
    torch.testing.assert_close(a @ a.T, torch.diag(sv[:3] / s), rtol=0, atol=1e-6)


@pytest.mark.parametrize("kind", ["linear", "conv1d"])
def test_olora_factors_are_the_leading_qr_part(kind):
    holder = _holder(kind, "olora")
    layer = holder.layer
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    q, rr = torch.linalg.qr(_w(layer.base_layer))
    torch.testing.assert_close(b.abs(), q[:, :3].abs(), rtol=0, atol=1e-6)  # Q up to the sign of each column
    torch.testing.assert_close(b @ a, q[:, :3] @ rr[:3], rtol=0, atol=1e-6)
    torch.testing.assert_close(b.T @ b, torch.eye(3, dtype=b.dtype), rtol=0, atol=1e-6)


@pytest.mark.parametrize("init", ["pissa", "olora"])
@pytest.mark.parametrize("base_name", ["llama", "gpt2"])
def test_model_starts_exactly_as_the_base(init, base_name, base_copy, input_ids):
    model = base_copy(base_name)
    targets = ["q_proj", "v_proj", "down_proj"] if base_name == "llama" else ["c_attn", "c_proj"]
    lorakit.add_adapter(model, LoraConfig(r=4, alpha=8, target_modules=targets, init=init, use_rslora=True))
    assert torch.equal(model(input_ids).logits, base_copy(base_name)(input_ids).logits)
    # The base weights themselves are untouched: the residual is a separate frozen term.
    reference = dict(base_copy(base_name).named_parameters())
    for path, layer in lora_layers(model):
        assert torch.equal(layer.base_layer.weight, reference[f"{path}.weight"])


@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_trained_adapter_is_residual_plus_low_rank(init):
    """y = x·(W_res + s·B·A)ᵀ + b with W_res = W0 − s·B0·A0, the factors at init (float64)."""
    holder = _holder("linear", init)
    layer, s = holder.layer, 6.0 / 3
    a0, b0 = layer.lora_A["default"].weight.detach().clone(), layer.lora_B["default"].weight.detach().clone()
    randomize_trainable(holder, std=0.3)
    a, b = layer.lora_A["default"].weight.detach(), layer.lora_B["default"].weight.detach()
    x = torch.randn(4, 7, dtype=torch.float64)
    w_res = layer.base_layer.weight.detach() - s * b0 @ a0
    expected = x @ (w_res + s * b @ a).T + layer.base_layer.bias.detach()
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12)
    lorakit.merge(holder)
    torch.testing.assert_close(holder(x), expected, rtol=0, atol=1e-12)


def test_disable_delete_and_other_adapters_see_the_original_base(base_copy, input_ids):
    model = base_copy("llama")
    base_logits = base_copy("llama")(input_ids).logits
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj", "v_proj"]), "plain")
    randomize_trainable(model)
    plain_logits = model(input_ids).logits
    lorakit.add_adapter(model, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"), "pissa")
    randomize_trainable(model)
    with lorakit.disable_adapters(model):
        assert torch.equal(model(input_ids).logits, base_logits)
    lorakit.set_adapter(model, "plain")
    assert torch.equal(model(input_ids).logits, plain_logits)
    lorakit.delete_adapter(model, "pissa")
    assert torch.equal(model(input_ids).logits, plain_logits)
    lorakit.delete_adapter(model, "plain")
    assert torch.equal(model(input_ids).logits, base_logits)


# -- saving and PEFT ------------------------------------------------------------------------------
CASES = {
    "pissa-llama": ("llama", "pissa", dict(r=4, alpha=8, target_modules=["q_proj", "v_proj", "up_proj"])),
    "pissa-gpt2": ("gpt2", "pissa", dict(r=2, alpha=3, target_modules=["c_attn", "c_fc"])),
    "olora-llama": ("llama", "olora", dict(r=3, alpha=3, target_modules=["k_proj", "o_proj"])),
    "pissa-dora-rslora": (
        "llama",
        "pissa",
        dict(r=2, alpha=4, target_modules=["q_proj"], use_dora=True, use_rslora=True),
    ),
}


def _trained(base_copy, case):
    base_name, init, kwargs = CASES[case]
    model = base_copy(base_name)
    lorakit.add_adapter(model, LoraConfig(**kwargs, init=init))
    randomize_trainable(model, std=0.2)
    return model


@pytest.mark.parametrize("case", CASES)
@pytest.mark.parametrize("convert", [False, True])
def test_lorakit_adapter_loads_in_peft(case, convert, base_copy, input_ids, tmp_path):
    base_name, init, kwargs = CASES[case]
    model = _trained(base_copy, case)
    expected = model(input_ids).logits
    assert not torch.allclose(expected, base_copy(base_name)(input_ids).logits, atol=1e-3)
    lorakit.save_adapter(model, tmp_path, convert_to_lora=convert)
    saved = json.loads((tmp_path / "adapter_config.json").read_text())
    if convert:  # a plain LoRA of the original base, twice the rank, the same scaling
        assert saved["init_lora_weights"] is True and saved["r"] == 2 * kwargs["r"]
        factor = math.sqrt(2) if kwargs.get("use_rslora") else 2
        assert saved["lora_alpha"] == pytest.approx(factor * kwargs["alpha"])
    else:  # as PEFT writes it: the loader redoes the decomposition of the original base
        assert saved["init_lora_weights"] == init and saved["r"] == kwargs["r"]

    peft_model = PeftModel.from_pretrained(base_copy(base_name), tmp_path).eval()
    torch.testing.assert_close(peft_model(input_ids).logits, expected, rtol=0, atol=1e-5)
    again = base_copy(base_name)
    lorakit.load_adapter(again, tmp_path)
    torch.testing.assert_close(again(input_ids).logits, expected, rtol=0, atol=1e-5)


@pytest.mark.parametrize("case", CASES)
def test_peft_adapter_loads_in_lorakit(case, base_copy, input_ids, tmp_path):
    base_name, init, kwargs = CASES[case]
    peft_model = get_peft_model(
        base_copy(base_name),
        PeftLoraConfig(
            r=kwargs["r"],
            lora_alpha=kwargs["alpha"],
            target_modules=kwargs["target_modules"],
            init_lora_weights=init,
            use_dora=kwargs.get("use_dora", False),
            use_rslora=kwargs.get("use_rslora", False),
            fan_in_fan_out=base_name == "gpt2",
        ),
    )
    randomize_trainable(peft_model, std=0.2)
    peft_model.eval()
    expected = peft_model(input_ids).logits
    peft_model.save_pretrained(tmp_path)
    model = base_copy(base_name)
    lorakit.load_adapter(model, tmp_path)
    assert lorakit.adapter_config(model, "default").init == init
    torch.testing.assert_close(model(input_ids).logits, expected, rtol=0, atol=1e-5)


def test_merged_weights_equal_pefts(base_copy, tmp_path):
    model = _trained(base_copy, "pissa-llama")
    lorakit.save_adapter(model, tmp_path)
    ours = lorakit.merge_and_unload(model)
    theirs = PeftModel.from_pretrained(base_copy("llama"), tmp_path).merge_and_unload()
    for key, value in theirs.state_dict().items():
        torch.testing.assert_close(ours.state_dict()[key], value, rtol=0, atol=1e-6, msg=key)


def test_patterns_are_converted_with_the_scaling_kept(base_copy, input_ids, tmp_path):
    model = base_copy("llama")
    config = LoraConfig(
        r=2,
        alpha=3,
        target_modules=["q_proj", "v_proj"],
        init="pissa",
        use_rslora=True,
        rank_pattern={"v_proj": 3},
        alpha_pattern={"v_proj": 5},
    )
    lorakit.add_adapter(model, config)
    randomize_trainable(model, std=0.2)
    expected = model(input_ids).logits
    lorakit.save_adapter(model, tmp_path, convert_to_lora=True)
    loaded = lorakit.read_adapter(tmp_path)[0]
    assert (loaded.r, loaded.rank_pattern, loaded.init) == (4, {"v_proj": 6}, "kaiming")
    assert loaded.alpha_pattern["v_proj"] == pytest.approx(5 * math.sqrt(2))
    fresh = base_copy("llama")
    lorakit.load_adapter(fresh, tmp_path)
    torch.testing.assert_close(fresh(input_ids).logits, expected, rtol=0, atol=1e-5)


# -- refusals -------------------------------------------------------------------------------------
@pytest.mark.parametrize("init", ["pissa", "olora"])
def test_weight_inits_on_embeddings_are_refused(init, llama, unchanged):
    with unchanged(llama), pytest.raises(ValueError, match=f"init='{init}' is implemented for Linear"):
        lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj", "embed_tokens"], init=init))


def test_randomised_pissa_from_peft_is_refused(llama, unchanged, tmp_path):
    lorakit.add_adapter(llama, LoraConfig(r=2, target_modules=["q_proj"], init="pissa"))
    lorakit.save_adapter(llama, tmp_path)
    config = tmp_path / "adapter_config.json"
    config.write_text(config.read_text().replace('"pissa"', '"pissa_niter_4"'))
    fresh = type(llama)(llama.config)
    with unchanged(fresh), pytest.raises(lorakit.AdapterFileError, match="pissa_niter_4"):
        lorakit.load_adapter(fresh, tmp_path)
