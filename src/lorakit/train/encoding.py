"""Tokenizing examples: the prompt format shared by training (`encode_causal`) and generation
(`encode_prompt`), so that the model sees identical prompts in both; how a generation row longer than
max_length is cut (`fit`); classification and regression inputs; and the collator that pads a batch.
`lorakit.train.data` re-exports all of them.

A row that does not fit keeps the end of its prompt (behind the template's opening tokens, such as a
system turn and the user header, which stay) and as much of its target as fits: the target keeps at least
half of max_length (all of it when shorter), and the prompt the rest.
"""

from __future__ import annotations

from collections.abc import Mapping, Sequence
from typing import Any, NamedTuple

import torch
from torch.nn.utils.rnn import pad_sequence
from transformers import PreTrainedTokenizerBase

from .chat import encode_conversation, render
from .examples import IGNORE_INDEX, ClassExample, Conversation, DataError, Example, Prompt

PROMPT_FORMATS = ("chat", "plain")


def apply_prompt_format(tokenizer: PreTrainedTokenizerBase, prompt_format: str) -> None:
    """Make `format_prompt` write this tokenizer's prompts in `prompt_format`. "chat" keeps the chat template
    (when the tokenizer has one); "plain" removes it from this tokenizer object, so a prompt is BOS, the text
    and a newline: shorter rows for a fine-tune on one task (the template's system turn and headers are a
    third of an E2E row), and a model trained so expects its prompts in that form."""
    if prompt_format not in PROMPT_FORMATS:
        raise DataError(f"prompt format must be one of {', '.join(PROMPT_FORMATS)}, got {prompt_format!r}")
    if prompt_format == "plain":
        tokenizer.chat_template = None


def format_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> str:
    """The complete model input for a prompt, special tokens written out, to be tokenized with
    add_special_tokens=False. A text: the chat template's user turn and assistant header when the tokenizer
    has a template, else BOS (if the tokenizer has one), the text and a newline. A conversation: the chat
    template's turns and the assistant header."""
    if not isinstance(prompt, str):
        return render(tokenizer, prompt, generation_prompt=True)
    if tokenizer.chat_template:
        messages = [{"role": "user", "content": prompt}]
        return str(tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    return (tokenizer.bos_token or "") + prompt + "\n"


def encode_prompt(tokenizer: PreTrainedTokenizerBase, prompt: Prompt) -> list[int]:
    """Token ids of the formatted prompt: what generation feeds the model, and the masked part of a training row."""
    return tokenizer(format_prompt(tokenizer, prompt), add_special_tokens=False).input_ids


class CausalTokens(NamedTuple):
    """A generation example tokenized for training, before it is cut to a length."""

    prompt_ids: list[int]
    prompt_labels: list[int]  # IGNORE_INDEX everywhere but on a conversation's earlier assistant turns
    target_ids: list[int]  # the target and what ends it (EOS, or the chat template's end-of-turn token)

    @property
    def length(self) -> int:
        return len(self.prompt_ids) + len(self.target_ids)


def causal_tokens(tokenizer: PreTrainedTokenizerBase, example: Example) -> CausalTokens:
    """The whole row of a generation example: prompt (masked) and target (trained, ended by EOS)."""
    if not isinstance(example.prompt, str):
        return CausalTokens(*encode_conversation(tokenizer, example.prompt, example.target))
    prompt_ids = encode_prompt(tokenizer, example.prompt)
    if tokenizer.eos_token_id is None:
        raise DataError("the tokenizer has no EOS token to end the target with")
    target_ids = tokenizer(example.target, add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    return CausalTokens(prompt_ids, [IGNORE_INDEX] * len(prompt_ids), target_ids)


def template_head(tokenizer: PreTrainedTokenizerBase, prompt: Prompt, prompt_ids: Sequence[int]) -> int:
    """How many leading tokens of the prompt the template writes before the text a user gave (BOS, a system
    turn, the user header): those that the prompt shares with the same template around an empty text."""
    bare: Prompt = ""
    if not isinstance(prompt, str):
        system: Conversation = tuple(turn for turn in prompt if turn["role"] == "system")
        bare = (*system, {"role": "user", "content": ""})
    bare_ids = encode_prompt(tokenizer, bare)
    shared = 0
    while shared < min(len(bare_ids), len(prompt_ids)) and bare_ids[shared] == prompt_ids[shared]:
        shared += 1
    return shared


def fit(tokens: CausalTokens, max_length: int, head: int = 0) -> CausalTokens:
    """The row cut to max_length (≥ 2): the target keeps min(its length, max(room after the prompt, half of
    max_length)) tokens from its start; the prompt keeps its first `head` tokens (when they take at most half
    of its room) and its end."""
    if tokens.length <= max_length:
        return tokens
    prompt_ids, prompt_labels, target_ids = tokens
    target_room = min(len(target_ids), max(max_length - len(prompt_ids), max_length // 2))
    prompt_room = max_length - target_room
    if len(prompt_ids) > prompt_room:
        kept_head = head if head <= prompt_room // 2 else 0
        tail_start = len(prompt_ids) - (prompt_room - kept_head)
        prompt_ids = prompt_ids[:kept_head] + prompt_ids[tail_start:]
        prompt_labels = prompt_labels[:kept_head] + prompt_labels[tail_start:]
    return CausalTokens(prompt_ids, prompt_labels, target_ids[:target_room])


def encode_causal(
    tokenizer: PreTrainedTokenizerBase, example: Example, max_length: int | None = None
) -> dict[str, list[int]]:
    """input_ids, attention_mask and labels for one generation example; the loss covers the target and what
    ends it (and a conversation's earlier assistant turns). A row longer than max_length is cut (`fit`)."""
    tokens = causal_tokens(tokenizer, example)
    if max_length is not None and tokens.length > max_length:
        if max_length < 2:
            raise DataError(f"max_length {max_length} leaves no room for a prompt and a target")
        tokens = fit(tokens, max_length, template_head(tokenizer, example.prompt, tokens.prompt_ids))
    input_ids = tokens.prompt_ids + tokens.target_ids
    return {
        "input_ids": input_ids,
        "attention_mask": [1] * len(input_ids),
        "labels": tokens.prompt_labels + tokens.target_ids,
    }


def encode_classification(
    tokenizer: PreTrainedTokenizerBase, example: ClassExample, max_length: int | None = None
) -> dict[str, Any]:
    """Tokenizer outputs (truncated to max_length when given) plus the label (an id, or a regression target)."""
    truncate = max_length is not None
    encoded = tokenizer(example.text, example.text_pair, truncation=truncate, max_length=max_length)
    return {**encoded, "labels": example.label}


class Collator:
    """Pads a list of encoded examples to the longest in the batch (on the right) and returns tensors:
    input_ids with the pad id, token labels with -100, every other sequence with 0. One label per example
    stays as it is: integer ids, or float regression targets (as float32)."""

    def __init__(self, pad_token_id: int):
        self.pad_token_id = pad_token_id

    def __call__(self, features: Sequence[Mapping[str, Any]]) -> dict[str, torch.Tensor]:
        batch = {}
        for key in features[0]:
            values = [feature[key] for feature in features]
            if not isinstance(values[0], (list, tuple)):
                floats = any(isinstance(v, float) for v in values)
                batch[key] = torch.tensor(values, dtype=torch.float32 if floats else None)  # one label per example
                continue
            pad = {"input_ids": self.pad_token_id, "labels": IGNORE_INDEX}.get(key, 0)
            batch[key] = pad_sequence([torch.tensor(v) for v in values], batch_first=True, padding_value=pad)
        return batch
