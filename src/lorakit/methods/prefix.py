"""Prefix tuning (Li & Liang 2021): `prefix_length` trainable key and value vectors in every attention
layer, which every token attends to as if they stood before the input.

How: each attention module gets a `lorakit_prefix` (keys and values per key/value head) and sees a config
view whose attention implementation is `lorakit_prefix`, a function registered with transformers that
prepends the prefix to the keys and values (after the rotary embedding: the prefix carries no position),
widens the attention mask by as many always-visible columns, and calls the model's own implementation
(sdpa or eager). Nothing else changes: not the cache (generation caches only the real tokens' keys and
values, and the prefix is added again at every step), not the mask the model builds, not the tokens'
positions. This works alike for decoders and for encoders such as BERT, where transformers 5 has no
cache to put a prefix in.

Positions: tokens keep the numbers the base model gives them (0, 1, ...), and a forward pre-hook derives
position ids from the attention mask when none are given, so that a left-padded row sees the prefix as
the row alone does. (PEFT numbers the tokens from P instead, the prefix taking positions 0..P-1 of its
cache: its outputs equal these with position ids P, P+1, ... passed in.)

Initialisation: the keys and values the base model computes for P random vocabulary tokens (Li & Liang
found activations of real words a better start than random vectors); no reparametrisation MLP.
"""

from __future__ import annotations

import sys
from typing import Any, cast

import torch
from torch import nn
from transformers.modeling_utils import ALL_ATTENTION_FUNCTIONS

from .base import MethodOptions, MethodState, PositionsFromMask, float_dtype, text_config, transformer_blocks

OPTIONS = ("prefix_length",)
ATTENTION_NAME = "lorakit_prefix"
SUPPORTED = ("sdpa", "eager")


class Prefix(nn.Module):
    """Keys and values of one attention layer's prefix, each (key/value heads, prefix_length, head_dim)."""

    def __init__(
        self, heads: int, length: int, head_dim: int, dtype: torch.dtype, device: torch.device, state: MethodState
    ) -> None:
        super().__init__()
        self.key = nn.Parameter(torch.zeros(heads, length, head_dim, dtype=dtype, device=device))
        self.value = nn.Parameter(torch.zeros(heads, length, head_dim, dtype=dtype, device=device))
        self.state = state
        self.captured: list[torch.Tensor] | None = None  # a list while the initial keys/values are recorded

    def extend(
        self, key: torch.Tensor, value: torch.Tensor, mask: torch.Tensor | None, query_length: int, causal: bool
    ) -> tuple[torch.Tensor, torch.Tensor, torch.Tensor | None]:
        """Keys and values with the prefix in front, and the attention mask widened to match."""
        batch, length, kv_length = key.shape[0], self.key.shape[1], key.shape[2]
        key = torch.cat([self.key.to(key.dtype).unsqueeze(0).expand(batch, -1, -1, -1), key], dim=2)
        value = torch.cat([self.value.to(value.dtype).unsqueeze(0).expand(batch, -1, -1, -1), value], dim=2)
        if mask is None:
            if not causal or query_length == 1:
                return key, value, None  # everything visible, the prefix too
            # The model left causality to sdpa's is_causal, which cannot express the extra columns.
            rows = torch.arange(query_length, device=key.device)[:, None] + (kv_length - query_length)
            visible = torch.arange(kv_length, device=key.device)[None, :] <= rows
            mask = visible[None, None]
        fill = True if mask.dtype == torch.bool else 0.0  # boolean masks say "visible", float masks are added
        pad = torch.full((*mask.shape[:-1], length), fill, dtype=mask.dtype, device=mask.device)
        return key, value, torch.cat([pad, mask], dim=-1)


class _ConfigView:
    """An attention module's config as its forward reads it: the model's config, except that the attention
    implementation is the prefix's (which then calls the model's own, `original._attn_implementation`)."""

    def __init__(self, original) -> None:
        self.original = original
        self._attn_implementation = ATTENTION_NAME

    def __getattr__(self, name: str):
        if name == "original":  # looked up before __init__ ran (copy, pickle)
            raise AttributeError(name)
        return getattr(self.original, name)


def _eager(module: nn.Module):
    """The eager attention function of the module's own modeling file (its fallback for 'eager')."""
    return getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)


def _prefix_attention(
    module: nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs,
):
    prefix = cast(Prefix, module.lorakit_prefix)
    config: Any = module.config
    inner = ALL_ATTENTION_FUNCTIONS.get_interface(config.original._attn_implementation, _eager(module))
    if prefix.captured is not None:
        prefix.captured = [key[0].detach(), value[0].detach()]
    elif prefix.state.enabled:
        causal = kwargs.get("is_causal")
        causal = getattr(module, "is_causal", False) if causal is None else causal
        key, value, attention_mask = prefix.extend(key, value, attention_mask, query.shape[2], causal)
    return inner(module, query, key, value, attention_mask, **kwargs)


ALL_ATTENTION_FUNCTIONS.register(ATTENTION_NAME, _prefix_attention)


def attention_modules(model: nn.Module) -> list[nn.Module]:
    """One attention module per transformer layer: the module that calls transformers' attention interface,
    known by its config, layer index and causality flag (LlamaAttention, BertSelfAttention, GPT2Attention...)."""
    found = []
    for index, block in enumerate(transformer_blocks(model)):
        inside = [m for m in block.modules() if all(hasattr(m, a) for a in ("config", "layer_idx", "is_causal"))]
        if len(inside) != 1:
            raise ValueError(
                f"prefix tuning: layer {index} of {type(model).__name__} has {len(inside)} attention "
                "modules; one self-attention per layer is supported"
            )
        found.append(inside[0])
    return found


def _kv_shape(model: nn.Module, module: nn.Module) -> tuple[int, int]:
    """(key/value heads, head size) of an attention module."""
    config = text_config(model)
    head_dim = (
        getattr(module, "head_dim", None)
        or getattr(module, "attention_head_size", None)
        or config.hidden_size // config.num_attention_heads
    )
    return getattr(config, "num_key_value_heads", None) or config.num_attention_heads, head_dim


def apply(model: nn.Module, options: MethodOptions, state: MethodState) -> None:
    modules = attention_modules(model)
    for module in modules:
        implementation = cast(Any, module.config)._attn_implementation
        if implementation not in SUPPORTED or _eager(module) is None:
            raise ValueError(
                f"prefix tuning works with sdpa or eager attention; {type(module).__name__} uses "
                f"{implementation!r} (load the model with attn_implementation='sdpa')"
            )
    dtype = float_dtype(model)
    for module in modules:
        heads, head_dim = _kv_shape(model, module)
        device = next(module.parameters()).device
        module.lorakit_prefix = Prefix(heads, options.prefix_length, head_dim, dtype, device, state)
        module.__dict__["config"] = _ConfigView(module.config)  # a plain attribute, as `remove` finds it
    # On the backbone, which lorakit's fused causal-LM loss calls directly.
    getattr(model, "base_model", model).register_forward_pre_hook(PositionsFromMask(state), with_kwargs=True)
    _initialise(model, [cast(Prefix, m.lorakit_prefix) for m in modules], options.prefix_length)


@torch.no_grad()
def _initialise(model: nn.Module, prefixes: list[Prefix], length: int) -> None:
    """Keys and values of `length` random vocabulary tokens (the global RNG draws them)."""
    device = prefixes[0].key.device
    if device.type == "meta":  # lorakit estimate: shapes only
        return
    ids = torch.randint(0, text_config(model).vocab_size, (1, length), device=device)
    was_training = model.training
    model.eval()
    for prefix in prefixes:
        prefix.captured = []
    try:
        model(input_ids=ids, attention_mask=torch.ones_like(ids))
        for prefix in prefixes:
            if not prefix.captured:  # the layer's attention did not run: nothing to start from
                raise RuntimeError("prefix tuning: an attention layer did not run on the initialisation tokens")
            prefix.key.copy_(prefix.captured[0])
            prefix.value.copy_(prefix.captured[1])
    finally:
        for prefix in prefixes:
            prefix.captured = None
        model.train(was_training)


def remove(model: nn.Module) -> None:
    for module in model.modules():
        view = module.__dict__.get("config")
        if isinstance(view, _ConfigView):
            module.config = view.original
