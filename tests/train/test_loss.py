"""The fused causal-LM loss against transformers' logits and loss, and their gradients, in float64."""

from __future__ import annotations

import pytest
import torch
import torch.nn.functional as F

import lorakit
from lorakit.train.loss import causal_lm_loss, fused_head, linear_cross_entropy
from support.models import VOCAB, make_gpt2, make_llama, randomize_lora


def _batch(pad_right: int = 3) -> dict[str, torch.Tensor]:
    g = torch.Generator().manual_seed(0)
    input_ids = torch.randint(3, VOCAB, (3, 9), generator=g)
    attention_mask = torch.ones_like(input_ids)
    attention_mask[1, -pad_right:] = 0
    labels = input_ids.clone()
    labels[:, :4] = -100  # a prompt
    labels[attention_mask == 0] = -100
    return {"input_ids": input_ids, "attention_mask": attention_mask, "labels": labels}


def _grads(model) -> dict[str, torch.Tensor]:
    return {n: p.grad.clone() for n, p in model.named_parameters() if p.grad is not None}


@pytest.mark.parametrize("build", [make_llama, lambda: make_llama(tied=True), make_gpt2])
@pytest.mark.parametrize("method", ["lora", "full"])
def test_loss_and_gradients_equal_transformers(build, method):
    model = build().double().eval()  # deterministic: GPT-2 has dropout in the base model
    if method == "lora":
        lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules="all-linear", dropout=0.0))
        randomize_lora(model)
    assert fused_head(model) is not None
    batch = _batch()
    # transformers casts logits to float32 for its loss; the reference keeps float64 all the way.
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(expected.float(), model(**batch).loss)
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, batch)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    grads = _grads(model)
    assert grads.keys() == expected_grads.keys() and grads
    for name, grad in grads.items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def _head_inputs(seed: int) -> tuple[torch.Tensor, ...]:
    """11 rows of hidden states (d = 6), a 20-class head with bias, and a target per row, in float64."""
    g = torch.Generator().manual_seed(seed)
    hidden = torch.randn(11, 6, dtype=torch.float64, generator=g, requires_grad=True)
    weight = torch.randn(20, 6, dtype=torch.float64, generator=g, requires_grad=True)
    bias = torch.randn(20, dtype=torch.float64, generator=g, requires_grad=True)
    return hidden, weight, bias, torch.randint(0, 20, (11,), generator=g)


def test_chunks_and_bias_give_the_written_out_cross_entropy():
    hidden, weight, bias, targets = _head_inputs(seed=1)
    got = linear_cross_entropy(hidden, weight, bias, targets, chunk=4) * 0.5
    logits = hidden @ weight.t() + bias
    expected = 0.5 * (torch.logsumexp(logits, -1) - logits[torch.arange(11), targets]).sum()
    torch.testing.assert_close(got, expected)
    for a, b in zip(
        torch.autograd.grad(got, (hidden, weight, bias)), torch.autograd.grad(expected, (hidden, weight, bias))
    ):
        torch.testing.assert_close(a, b)
    assert torch.autograd.gradcheck(
        lambda h, w, b: linear_cross_entropy(h, w, b, targets, chunk=3), (hidden, weight, bias)
    )


def test_falls_back_where_the_head_is_not_plain(bert):
    model = make_llama().double()
    lorakit.add_adapter(model, lorakit.LoraConfig(r=2, target_modules=["lm_head"]))  # an adapted head
    assert fused_head(model) is None
    batch = _batch()
    torch.testing.assert_close(causal_lm_loss(model, batch), model(**batch).loss)
    assert fused_head(bert) is None
    wrapped = torch.nn.Sequential(make_llama())  # no config: not a transformers model
    assert fused_head(wrapped) is None


def test_no_targets_gives_zero_not_nan():
    model = make_llama().double()
    batch = _batch()
    batch["labels"][:] = -100
    assert causal_lm_loss(model, batch).item() == 0.0


def test_no_grad_evaluation_matches_cross_entropy():
    model = make_llama().double().eval()
    batch = _batch()
    with torch.no_grad():
        got = causal_lm_loss(model, batch)
        logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    expected = F.cross_entropy(logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1), ignore_index=-100)
    torch.testing.assert_close(got, expected)


EPSILON = 0.1


def _smoothed_reference(logits: torch.Tensor, targets: torch.Tensor, epsilon: float) -> torch.Tensor:
    """Label smoothing written out: (1 − ε)·(−log p_target) + ε·mean over classes of (−log p_j), summed over rows."""
    log_p = torch.log_softmax(logits, dim=-1)
    return ((1 - epsilon) * -log_p[torch.arange(len(targets)), targets] + epsilon * -log_p.mean(dim=-1)).sum()


def test_label_smoothing_gives_the_written_out_loss_and_gradients():
    hidden, weight, bias, targets = _head_inputs(seed=2)
    got = linear_cross_entropy(hidden, weight, bias, targets, chunk=4, smoothing=EPSILON)
    expected = _smoothed_reference(hidden @ weight.t() + bias, targets, EPSILON)
    torch.testing.assert_close(got, expected)
    for a, b in zip(
        torch.autograd.grad(got, (hidden, weight, bias)), torch.autograd.grad(expected, (hidden, weight, bias))
    ):
        torch.testing.assert_close(a, b)
    plain = linear_cross_entropy(hidden, weight, bias, targets, chunk=4)
    assert got.item() != pytest.approx(plain.item())


@pytest.mark.parametrize("fused", [True, False])
def test_smoothed_causal_lm_loss_and_gradients_equal_the_reference(fused):
    model = make_llama().double().eval()
    targets = "all-linear" if fused else ["q_proj", "lm_head"]  # an adapted head is not fused
    lorakit.add_adapter(model, lorakit.LoraConfig(r=4, target_modules=targets, dropout=0.0))
    randomize_lora(model)
    assert (fused_head(model) is not None) == fused
    batch = _batch()
    logits = model(input_ids=batch["input_ids"], attention_mask=batch["attention_mask"]).logits
    shifted, labels = logits[:, :-1].reshape(-1, VOCAB), batch["labels"][:, 1:].reshape(-1)
    keep = labels != -100
    expected = _smoothed_reference(shifted[keep], labels[keep], EPSILON) / keep.sum()
    expected.backward()
    expected_grads = _grads(model)
    model.zero_grad(set_to_none=True)
    got = causal_lm_loss(model, batch, label_smoothing=EPSILON)
    got.backward()
    torch.testing.assert_close(got, expected, rtol=1e-12, atol=1e-12)
    for name, grad in _grads(model).items():
        torch.testing.assert_close(grad, expected_grads[name], rtol=1e-10, atol=1e-12, msg=name)


def test_smoothed_classification_loss_and_regression_refused(bert):
    model = bert.double().eval()
    g = torch.Generator().manual_seed(3)
    batch = {"input_ids": torch.randint(3, 50, (4, 7), generator=g), "labels": torch.tensor([0, 2, 1, 2])}
    logits = model(input_ids=batch["input_ids"]).logits
    expected = _smoothed_reference(logits, batch["labels"], EPSILON) / 4
    torch.testing.assert_close(causal_lm_loss(model, batch, label_smoothing=EPSILON), expected)
    with pytest.raises(ValueError, match="regression"):
        causal_lm_loss(model, {**batch, "labels": torch.randn(4, dtype=torch.float64)}, label_smoothing=EPSILON)


@pytest.mark.parametrize("epsilon", [-0.1, 1.0])
def test_label_smoothing_out_of_range_is_refused(epsilon):
    from lorakit.train.loop import LoopSettings

    with pytest.raises(ValueError, match="label_smoothing"):
        LoopSettings(label_smoothing=epsilon)
