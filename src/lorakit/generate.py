"""Batched greedy (or sampled) text generation with whatever adapters are active on the model.

Prompts are complete model inputs (chat formatting is the caller's, see `lorakit.train.data`), padded
on the left so that every row's new tokens start at the same position, and put on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import cast

import torch
from torch import nn
from transformers import GenerationMixin, PreTrainedTokenizerBase

from .device import model_device, to_device


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    temperature: float = 0.0,
    progress: bool = False,
    synced: bool = False,
) -> list[str]:
    """The continuation of each prompt, decoded without special tokens and stripped.

    `synced` keeps every process stepping until all are done (an FSDP-sharded model needs all of them
    in each forward pass)."""
    from tqdm.auto import tqdm

    was_training = model.training
    model.eval()
    saved_side = tokenizer.padding_side
    tokenizer.padding_side = "left"
    outputs: list[str] = []
    device = model_device(model)
    try:
        starts = range(0, len(prompts), batch_size)
        for start in tqdm(starts, disable=not progress, desc="generating", unit="batch"):
            chunk = list(prompts[start : start + batch_size])
            enc = to_device(tokenizer(chunk, return_tensors="pt", padding=True, add_special_tokens=False), device)
            sampling = {"do_sample": True, "temperature": temperature} if temperature > 0 else {"do_sample": False}
            out = cast(GenerationMixin, model).generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced,
                **sampling,
            )
            new_tokens = out[:, enc["input_ids"].shape[1] :]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return outputs
