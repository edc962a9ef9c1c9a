"""The memory-saving gated MLP against the model's own forward, in float64."""

from __future__ import annotations

import torch

import lorakit
from lorakit.train.swiglu import SiluMul, fuse_gated_mlps, unfuse_gated_mlps
from support.models import make_gpt2, make_llama, randomize_lora


def _loss_and_grads(model, input_ids):
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def test_same_loss_and_gradients_as_the_plain_mlp(input_ids):
    model = make_llama().double()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["gate_proj", "up_proj", "q_proj"]))
    randomize_lora(model)
    expected_loss, expected = _loss_and_grads(model, input_ids)
    changed = fuse_gated_mlps(model)
    assert len(changed) == 2 and fuse_gated_mlps(model) == []  # already done
    loss, grads = _loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=1e-13)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-11, atol=1e-13, msg=name)
    unfuse_gated_mlps(changed)
    assert all("forward" not in vars(m) for m in model.modules())


def test_gradcheck_and_saved_tensors():
    g = torch.Generator().manual_seed(0)
    gate = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    up = torch.randn(3, 5, dtype=torch.float64, generator=g, requires_grad=True)
    assert torch.autograd.gradcheck(SiluMul.apply, (gate, up))
    saved = []
    with torch.autograd.graph.saved_tensors_hooks(lambda t: saved.append(t) or t, lambda t: t):
        SiluMul.apply(gate, up)
    assert len(saved) == 2 and saved[0] is gate and saved[1] is up


def test_other_architectures_are_left_alone():
    assert fuse_gated_mlps(make_gpt2()) == []
