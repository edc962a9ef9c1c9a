"""The training step's fast paths as one switch: inside `training_fast_paths` a Llama has lean gated MLPs and
its q/k/v and gate/up LoRA layers grouped, its loss and gradients those of the plain model (float64, no
dropout); afterwards nothing of either is left; a sharded model keeps its layers ungrouped."""

from __future__ import annotations

import torch

import lorakit
from lorakit.layers import LoraLinear
from lorakit.train.fast_paths import training_fast_paths
from support.models import make_llama, randomize_lora

TARGETS = ["q_proj", "k_proj", "v_proj", "gate_proj", "up_proj"]


def adapted_llama() -> torch.nn.Module:
    model = make_llama().double()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, dropout=0.0, target_modules=TARGETS))
    randomize_lora(model)
    return model.train()


def loss_and_grads(model, input_ids) -> tuple[torch.Tensor, dict[str, torch.Tensor]]:
    model.zero_grad(set_to_none=True)
    loss = model(input_ids=input_ids, labels=input_ids).loss
    loss.backward()
    return loss.detach(), {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


def grouped(model) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear) and "input_group" in vars(m)]


def lean_mlps(model) -> list[torch.nn.Module]:
    return [m for m in model.modules() if "forward" in vars(m)]


def test_inside_the_step_runs_grouped_and_lean_with_the_plain_loss_and_gradients(input_ids):
    model = adapted_llama()
    expected_loss, expected = loss_and_grads(model, input_ids)
    with training_fast_paths(model):
        assert len(grouped(model)) == 2 * len(TARGETS)  # two layers, all five adapted layers in a group
        assert len(lean_mlps(model)) == 2
        loss, grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=1e-13)
    assert grads.keys() == expected.keys()
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-11, atol=1e-13, msg=name)
    assert grouped(model) == [] and lean_mlps(model) == []


def test_a_sharded_model_is_not_grouped_and_an_error_still_undoes_everything():
    model = adapted_llama()
    with training_fast_paths(model, sharded=True):
        assert grouped(model) == [] and len(lean_mlps(model)) == 2
    try:
        with training_fast_paths(model):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert grouped(model) == [] and lean_mlps(model) == []
