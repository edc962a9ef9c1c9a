"""Applying the methods of lorakit.methods to tiny Llama and BERT models: output shapes, exactly the method's
parameters train (counted from the model's dimensions), the frozen base is bit-identical after an optimizer
step, adapters start as the identity and compute x + W_up·f(W_down·x + b) + b, the prefix enters attention as
extra keys and values (checked against attention written out in float64), and bad calls change nothing."""

from __future__ import annotations

import copy

import pytest
import torch

import lorakit
from lorakit.methods import METHODS, MethodOptions, apply_method, disabled, method_name, remove_method
from support.models import HIDDEN, VOCAB, assert_same_snapshot, fill_, randomize_trainable, snapshot

OPTIONS = MethodOptions(adapter_size=4, prefix_length=3, prompt_length=5)
LAYERS, HEAD_DIM, KV_HEADS, LABELS = 2, 8, 1, 3  # support.models' models: 2 heads of 8 (Llama: 1 key/value head)


def adapter_count(width: int = HIDDEN, size: int = 4) -> int:
    return LAYERS * 2 * (width * size + size + size * width + width)  # two bottlenecks per layer, with biases


# Trainable parameters, from the dimensions alone (BERT adds its 16 × 3 + 3 classifier).
EXPECTED = {
    ("llama", "adapter"): adapter_count(),
    ("llama", "prefix"): LAYERS * 2 * 3 * KV_HEADS * HEAD_DIM,
    ("llama", "prompt"): 5 * HIDDEN,
    ("bert", "adapter"): adapter_count() + HIDDEN * LABELS + LABELS,
    ("bert", "prefix"): LAYERS * 2 * 3 * HIDDEN + HIDDEN * LABELS + LABELS,
    ("bert", "prompt"): 5 * HIDDEN + HIDDEN * LABELS + LABELS,
    ("bert", "head"): HIDDEN * LABELS + LABELS,
}
CASES = [("llama", m) for m in ("full", "adapter", "prefix", "prompt")] + [
    ("bert", m) for m in ("full", "bitfit", "adapter", "prefix", "prompt", "head")
]


def inputs(key: str, ids: torch.Tensor) -> dict:
    batch = {"input_ids": ids, "attention_mask": torch.ones_like(ids)}
    batch["labels"] = ids if key == "llama" else torch.tensor([0, 2])
    return batch


@pytest.mark.parametrize("key, method", CASES)
def test_shapes_trainable_set_and_frozen_base_after_a_step(base_copy, input_ids, key, method):
    model = base_copy(key)
    trainable, total = apply_method(model, method, OPTIONS)
    assert method_name(model) == method
    names = {n for n, p in model.named_parameters() if p.requires_grad}
    base_names = {n for n, _ in base_copy(key).named_parameters()}
    heads = {n for n in base_names if n.startswith("classifier.")}
    base_total = sum(p.numel() for p in base_copy(key).parameters())
    if method in ("adapter", "prefix", "prompt"):  # the method's new modules only, plus the head
        own = names - heads
        assert own and heads <= names and all(".lorakit_" in f".{n}" for n in own) and not own & base_names
    else:
        biases = {n for n in base_names if n.endswith("bias")}
        assert names == {"full": base_names, "bitfit": biases | heads, "head": heads}[method]
    if method == "full":
        assert trainable == total == base_total
    elif method == "bitfit":
        assert trainable == sum(p.numel() for n, p in base_copy(key).named_parameters() if n in names)
    else:
        assert trainable == EXPECTED[(key, method)]
        assert total == base_total + trainable - (HIDDEN * LABELS + LABELS if key == "bert" else 0)

    frozen = {n: p.detach().clone() for n, p in model.named_parameters() if not p.requires_grad}
    before = {n: p.detach().clone() for n, p in model.named_parameters() if p.requires_grad}
    model.train()
    out = model(**inputs(key, input_ids))
    assert out.logits.shape == ((2, 7, VOCAB) if key == "llama" else (2, LABELS))
    out.loss.backward()
    torch.optim.AdamW([p for p in model.parameters() if p.requires_grad], lr=1e-2).step()
    for name, value in model.named_parameters():
        if name in frozen:
            assert torch.equal(value, frozen[name]), f"{name} changed"
    assert any(not torch.equal(p, before[n]) for n, p in model.named_parameters() if n in before)


@pytest.mark.parametrize("key", ["llama", "bert"])
def test_adapter_starts_as_the_base_model_and_disabled_gives_the_base(base_copy, input_ids, key):
    model, base = base_copy(key), base_copy(key)
    apply_method(model, "adapter", OPTIONS)
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base(input_ids).logits)  # up-projection starts at zero
        for name, param in model.named_parameters():  # the adapters only: a head is not switched off
            if "lorakit_" in name:
                fill_(param, seed=len(name))
        assert not torch.allclose(model(input_ids).logits, base(input_ids).logits)
        with disabled(model):
            assert torch.equal(model(input_ids).logits, base(input_ids).logits)


@torch.no_grad()
def test_adapter_is_a_residual_bottleneck_after_each_output_projection(llama):
    apply_method(llama, "adapter", MethodOptions(adapter_size=4, adapter_nonlinearity="relu"))
    randomize_trainable(llama, std=0.5)
    layer = llama.model.layers[1]
    for projection, adapter, width_in in (
        (layer.self_attn.o_proj, layer.lorakit_adapter_attn, HIDDEN),
        (layer.mlp.down_proj, layer.lorakit_adapter_mlp, 32),
    ):
        h = torch.randn(2, 5, width_in, generator=torch.Generator().manual_seed(1))
        d = lambda t: t.double()  # noqa: E731
        out = d(h) @ d(projection.weight).T
        expected = (
            out
            + torch.relu(out @ d(adapter.down.weight).T + d(adapter.down.bias)) @ d(adapter.up.weight).T
            + d(adapter.up.bias)
        )
        torch.testing.assert_close(projection(h).double(), expected, rtol=1e-5, atol=1e-6)


def test_adapter_norms_option_trains_the_layer_norms(bert):
    apply_method(bert, "adapter", MethodOptions(adapter_size=4, adapter_norms=True))
    norms = {n for n, p in bert.named_parameters() if p.requires_grad and "LayerNorm" in n}
    # Two layer norms per layer (after attention, after the MLP), weight and bias; the embeddings' stays frozen.
    assert len(norms) == LAYERS * 2 * 2 and not any(n.startswith("bert.embeddings") for n in norms)


@torch.no_grad()
def test_prefix_is_extra_keys_and_values_in_attention(bert):
    """BERT self-attention with the prefix, against softmax(q·[Pk; k]ᵀ/√d)·[Pv; v] written out in float64."""
    apply_method(bert, "prefix", OPTIONS)
    randomize_trainable(bert, std=0.5)
    attention = bert.bert.encoder.layer[0].attention.self
    hidden = torch.randn(2, 6, HIDDEN, generator=torch.Generator().manual_seed(0))
    got = attention(hidden)[0]

    def heads(t):  # (batch, tokens, hidden) -> (batch, heads, tokens, head_dim)
        return t.view(2, -1, 2, HEAD_DIM).transpose(1, 2)

    d = lambda m: (m.weight.double(), m.bias.double())  # noqa: E731
    q, k, v = (heads(hidden.double() @ w.T + b) for w, b in map(d, (attention.query, attention.key, attention.value)))
    prefix = attention.lorakit_prefix
    k = torch.cat([prefix.key.double().expand(2, -1, -1, -1), k], dim=2)
    v = torch.cat([prefix.value.double().expand(2, -1, -1, -1), v], dim=2)
    weights = torch.softmax(q @ k.transpose(2, 3) / HEAD_DIM**0.5, dim=-1)
    expected = (weights @ v).transpose(1, 2).reshape(2, 6, HIDDEN)
    torch.testing.assert_close(got.double(), expected, rtol=1e-5, atol=1e-6)


@torch.no_grad()
def test_prefix_starts_from_real_token_activations(llama):
    torch.manual_seed(3)
    apply_method(llama, "prefix", OPTIONS)
    for layer in llama.model.layers:
        prefix = layer.self_attn.lorakit_prefix
        assert prefix.key.abs().sum() > 0 and prefix.value.abs().sum() > 0


@torch.no_grad()
def test_prefix_under_eager_and_sdpa_attention_agree(base_copy):
    """The two ways transformers passes masks (float for eager, boolean or none for sdpa) give one result."""
    ids = torch.randint(3, VOCAB, (2, 6), generator=torch.Generator().manual_seed(5))
    mask = torch.ones_like(ids)
    mask[1, 4:] = 0
    outputs = []
    for implementation in ("eager", "sdpa"):
        model = base_copy("llama")
        model.config._attn_implementation = implementation
        torch.manual_seed(0)
        apply_method(model, "prefix", OPTIONS)
        randomize_trainable(model, std=0.5)
        outputs.append(model(input_ids=ids, attention_mask=mask).logits[mask.bool()])
    torch.testing.assert_close(outputs[0], outputs[1], rtol=1e-5, atol=1e-5)


@pytest.mark.parametrize("method", ["adapter", "prefix", "prompt", "bitfit", "full"])
def test_remove_method_gives_the_base_model_back(base_copy, input_ids, method):
    model = base_copy("bert")
    before = snapshot(model)
    apply_method(model, method, OPTIONS)
    remove_method(model)
    assert_same_snapshot(before, snapshot(model))
    assert method_name(model) is None
    with torch.no_grad():
        assert torch.equal(model(input_ids).logits, base_copy("bert")(input_ids).logits)


@torch.no_grad()
def test_a_deep_copy_has_its_own_method(base_copy, input_ids):
    model = base_copy("llama")
    apply_method(model, "prompt", OPTIONS)
    reference = model(input_ids).logits
    twin = copy.deepcopy(model)
    randomize_trainable(twin, std=0.5)
    assert torch.equal(model(input_ids).logits, reference)
    assert not torch.allclose(twin(input_ids).logits, reference)
    with disabled(twin):
        assert torch.equal(model(input_ids).logits, reference)


@pytest.mark.parametrize(
    "key, method, options, message",
    [
        ("llama", "bitfit", OPTIONS, "no bias parameters"),
        ("llama", "head", OPTIONS, "classification head"),
        ("llama", "prefixx", OPTIONS, "unknown method 'prefixx'"),
        ("llama", "lora", OPTIONS, "lorakit.add_adapter"),
        ("bert", "adapter", MethodOptions(adapter_size=0), "adapter_size must be a positive integer"),
        ("bert", "adapter", MethodOptions(adapter_nonlinearity="swish"), "unknown adapter_nonlinearity"),
        ("llama", "prefix", OPTIONS, "sdpa or eager"),
    ],
)
def test_bad_calls_are_refused_and_change_nothing(base_copy, unchanged, key, method, options, message):
    model = base_copy(key)
    if method == "prefix":
        model.config._attn_implementation = "flex_attention"
    with unchanged(model), pytest.raises(ValueError, match=message):
        apply_method(model, method, options)


def test_one_method_at_a_time_and_not_beside_lora(base_copy, unchanged):
    model = base_copy("bert")
    apply_method(model, "prompt", OPTIONS)
    with unchanged(model), pytest.raises(ValueError, match="already has the 'prompt' method"):
        apply_method(model, "adapter", OPTIONS)
    lora = base_copy("bert")
    lorakit.add_adapter(lora, lorakit.LoraConfig(r=2, target_modules=["query"]))
    assert method_name(lora) == "lora"
    with unchanged(lora), pytest.raises(ValueError, match="LoRA adapters"):
        apply_method(lora, "adapter", OPTIONS)


def test_every_method_has_a_name_in_the_registry():
    assert METHODS == ("lora", "full", "bitfit", "adapter", "prefix", "prompt", "head")
