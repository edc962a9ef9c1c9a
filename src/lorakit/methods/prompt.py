"""Prompt tuning (Lester et al. 2021): `prompt_length` trainable input embeddings put in front of every input.

Both hooks sit on the model's backbone (`model.base_model`: LlamaModel, BertModel, ...). A forward pre-hook
embeds the input ids, prepends the soft prompt and widens the attention mask (visible), token type ids
(0) and position ids to match; a forward hook cuts the prompt's positions off the backbone's last hidden
states. So everything above the backbone (the LM head, labels and the loss, lorakit's fused loss,
a sequence classifier's pooling at the last real token) sees the caller's tokens only, and the loss
covers exactly the tokens it covers without a prompt. (BERT's pooler, inside the backbone, reads the
first position: the first prompt vector, as with PEFT.) Positions come from the widened mask, so that a
left-padded row gives what the row alone gives.

Generation: the first call (empty cache) puts the prompt in front, and into the cache; later calls
(cache filled) only widen the mask and shift given position ids by the prompt's length.

Initialisation: the embeddings of `prompt_length` random vocabulary tokens (Lester et al.'s sampled
vocabulary initialisation).
"""

from __future__ import annotations

from typing import Any, cast

import torch
from torch import nn
from transformers import PreTrainedModel

from .base import MethodHook, MethodOptions, MethodState, calling_kwargs, mask_positions, sequence_length

OPTIONS = ("prompt_length",)


class SoftPrompt(nn.Module):
    def __init__(self, embeddings: torch.Tensor) -> None:
        super().__init__()
        self.embeddings = nn.Parameter(embeddings)  # (prompt_length, hidden)


def _cached(kwargs: dict) -> int:
    cache: Any = kwargs.get("cache", kwargs.get("past_key_values"))
    return cache.get_seq_length() if hasattr(cache, "get_seq_length") else 0


class _Prepend(MethodHook):
    """Forward pre-hook on the backbone: the soft prompt in front of the input (see the module docstring)."""

    def __init__(self, state: MethodState, prompt: SoftPrompt, embedding: nn.Module) -> None:
        super().__init__(state)
        self.prompt = prompt
        self.embedding = embedding
        self.prepended = 0  # the current call's input length when the prompt went in front of it, else 0

    def __call__(self, module: nn.Module, args: tuple, kwargs: dict):
        self.prepended = 0
        if not self.state.enabled:
            return None
        kwargs = calling_kwargs(args, kwargs)
        n = self.prompt.embeddings.shape[0]
        length = sequence_length(kwargs)
        mask = kwargs.get("attention_mask")
        if mask is not None:
            if mask.dim() != 2:
                raise ValueError("prompt tuning needs a 2-D attention mask (batch, tokens)")
            mask = kwargs["attention_mask"] = torch.cat([mask.new_ones(mask.shape[0], n), mask], dim=1)
        positions = kwargs.get("position_ids")
        if _cached(kwargs):  # a later generation step: the prompt is in the cache already
            if positions is not None:
                kwargs["position_ids"] = positions + n
            elif mask is not None:
                kwargs["position_ids"] = mask_positions(mask, length)
            return (), kwargs
        ids, embeds = kwargs.pop("input_ids", None), kwargs.pop("inputs_embeds", None)
        if embeds is None:
            embeds = self.embedding(ids)
        batch = embeds.shape[0]
        prompt = self.prompt.embeddings.to(embeds.dtype).unsqueeze(0).expand(batch, -1, -1)
        kwargs["inputs_embeds"] = torch.cat([prompt, embeds], dim=1)
        types = kwargs.get("token_type_ids")
        if types is not None:
            kwargs["token_type_ids"] = torch.cat([types.new_zeros(types.shape[0], n), types], dim=1)
        if positions is not None:
            first = torch.arange(n, device=positions.device, dtype=positions.dtype).expand(positions.shape[0], n)
            kwargs["position_ids"] = torch.cat([first, positions + n], dim=1)
        elif mask is not None:
            kwargs["position_ids"] = mask_positions(mask, n + length)
        self.prepended = length
        return (), kwargs


class _CutHidden(MethodHook):
    """Forward hook on the backbone: the last hidden states of the caller's tokens only."""

    def __init__(self, state: MethodState, prepend: _Prepend) -> None:
        super().__init__(state)
        self.prepend = prepend

    def __call__(self, module: nn.Module, args: tuple, output):
        hidden = getattr(output, "last_hidden_state", None)
        length = self.prepend.prepended
        if not length or hidden is None:
            return None
        output.last_hidden_state = hidden[:, -length:]
        return output


def added_positions(options: MethodOptions) -> int:
    return options.prompt_length


def apply(model: nn.Module, options: MethodOptions, state: MethodState) -> None:
    embedding = cast(PreTrainedModel, model).get_input_embeddings()
    if not isinstance(embedding, nn.Embedding):
        raise ValueError(
            f"prompt tuning needs an nn.Embedding input layer; {type(model).__name__} has {type(embedding).__name__}"
        )
    with torch.no_grad():  # sampled-vocabulary initialisation (the global RNG draws the tokens)
        ids = torch.randint(0, embedding.num_embeddings, (options.prompt_length,), device=embedding.weight.device)
        start = embedding.weight[ids].clone()
    model.lorakit_prompt = SoftPrompt(start)
    prepend = _Prepend(state, model.lorakit_prompt, embedding)
    backbone = getattr(model, "base_model", model)
    backbone.register_forward_pre_hook(prepend, with_kwargs=True)
    backbone.register_forward_hook(_CutHidden(state, prepend))
