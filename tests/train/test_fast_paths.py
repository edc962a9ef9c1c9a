"""The training step's fast paths as one switch: inside `training_fast_paths` a Llama has lean gated MLPs, its
q/k/v and gate/up LoRA layers grouped and its down_proj layers owning their input (saving no more than before),
its loss and gradients those of the plain model (float64; owners also with dropout, same masks); afterwards
nothing of it is left; a sharded model keeps its layers ungrouped."""

from __future__ import annotations

import torch

import lorakit
from lorakit.layers import LoraLinear
from lorakit.layers.shared_input import unmark_input_owners
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


def owners(model) -> list[LoraLinear]:
    return [m for m in model.modules() if isinstance(m, LoraLinear) and "owns_input" in vars(m)]


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


def owner_llama() -> torch.nn.Module:
    model = make_llama().double()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, dropout=0.3, target_modules=["o_proj", "down_proj"]))
    randomize_lora(model)
    return model.train()


def test_layers_owning_their_input_train_as_the_plain_layers_with_the_same_dropout_masks(input_ids):
    model = owner_llama()
    torch.manual_seed(11)  # the masks' seeds come from the global generator, drawn in the same order below
    expected_loss, expected = loss_and_grads(model, input_ids)
    with training_fast_paths(model):
        assert [n for n, m in model.named_modules() if m in owners(model)] == [
            f"model.layers.{i}.mlp.down_proj" for i in range(2)
        ]
        torch.manual_seed(11)
        loss, grads = loss_and_grads(model, input_ids)
    torch.testing.assert_close(loss, expected_loss, rtol=1e-13, atol=1e-13)
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected[name], rtol=1e-11, atol=1e-13, msg=name)
    assert owners(model) == []


def saved_activation_bytes(model, input_ids) -> int:
    """Bytes of the distinct storages autograd keeps for the backward pass of a forward, parameters excluded."""
    params = {p.untyped_storage().data_ptr() for p in model.parameters()}
    storages: dict[int, int] = {}

    def pack(tensor):
        if tensor.untyped_storage().data_ptr() not in params:
            storages[tensor.untyped_storage().data_ptr()] = tensor.untyped_storage().nbytes()
        return tensor

    with torch.autograd.graph.saved_tensors_hooks(pack, lambda t: t):
        model(input_ids=input_ids, labels=input_ids)
    return sum(storages.values())


def test_owning_its_input_saves_the_dropped_out_input_in_place_of_x_at_no_extra_memory(input_ids):
    """What makes a module an input owner: x is kept by nothing else, so saving the dropped-out copy instead of x
    costs nothing."""
    model = owner_llama()
    with training_fast_paths(model):
        as_owners = saved_activation_bytes(model, input_ids)
        unmark_input_owners(owners(model))
        as_readers = saved_activation_bytes(model, input_ids)
    assert as_owners == as_readers


def test_a_sharded_model_is_not_grouped_and_an_error_still_undoes_everything():
    model = adapted_llama()
    with training_fast_paths(model, sharded=True):
        assert grouped(model) == [] and len(lean_mlps(model)) == 2
    assert owners(model) == []
    try:
        with training_fast_paths(model):
            raise KeyboardInterrupt
    except KeyboardInterrupt:
        pass
    assert grouped(model) == [] and lean_mlps(model) == []
