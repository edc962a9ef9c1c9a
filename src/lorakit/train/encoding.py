"""Tokenizing examples: the prompt format shared by training (`encode_causal`) and generation
(`encode_prompt`), so that the model sees identical prompts in both; classification inputs; and the
collator that pads a batch. `lorakit.train.data` re-exports all of them."""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .examples import IGNORE_INDEX, ClassExample, DataError, Example


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> str:
    """The complete model input for a prompt, special tokens written out, to be tokenized with
    add_special_tokens=False: the chat template's user turn and assistant header when the tokenizer
    has a template, else BOS (if the tokenizer has one), the prompt and a newline."""
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return (tokenizer.bos_token or "") + prompt + "\n"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: str) -> list[int]:
    """Token ids of the formatted prompt: what generation feeds the model, and the masked part of a training row."""
    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids


def encode_causal(tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels for one generation example; the loss covers the target and a
    final EOS only. The prompt is never cut: a prompt without room for the target is an error."""
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    if len(prompt_ids) >= max_length:
        raise DataError(
            f"prompt is {len(prompt_ids)} tokens, which leaves no room for the target within max_length "
            f"{max_length}; raise max_length or shorten the prompt"
        )
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to end the target with")
    target_ids = tokenizer(example.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    target_ids = target_ids[: max_length - len(prompt_ids)]
    input_ids = prompt_ids + target_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": [IGNORE_INDEX] * len(prompt_ids) + target_ids,
    }


def encode_classification(tokenizer: PreTrainedTokenizerBase, example: ClassExample, max_length: int) -> dict[str, Any]:
    """Tokenizer outputs (truncated to max_length) plus the integer label for one classification example."""
    encoded = tokenizer(example.text, example.text_pair, truncation=True, max_length=max_length)
    return {**encoded, "labels": example.label}


class Collator:
    """Pads a list of encoded examples to the longest in the batch (on the right) and returns tensors:
    input_ids with the pad id, token labels with -100, every other sequence with 0."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in features[0]:
            values = [feature[key] for feature in features]
            if not isinstance(values[0], (list, tuple)):
                batch[key] = torch.tensor(values)  # one label per example
                continue
            pad = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = pad_sequence([torch.tensor(v) for v in values], batch_first=True, padding_value=pad)
        return batch
