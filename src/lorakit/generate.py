"""Batched text generation with whatever adapters are active on the model, and how its tokens are chosen
(`Decoding`: greedy, beam search as the LoRA paper decodes E2E, or sampling).

Prompts are complete model inputs (chat formatting is the caller's, see `lorakit.train.data`), padded
on the left so that every row's new tokens start at the same position, and put on the model's device.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any, cast

import torch
from torch import nn
from transformers import GenerationMixin, LogitsProcessor, LogitsProcessorList, PreTrainedTokenizerBase
from transformers.generation.logits_process import NoRepeatNGramLogitsProcessor

from .device import model_device, to_device


@dataclass(frozen=True)
class Decoding:
    """How each next token is chosen. The defaults are greedy decoding; the LoRA paper decodes E2E with
    num_beams=10, length_penalty=0.9, no_repeat_ngram_size=4."""

    num_beams: int = 1  # beam search width (1: no beam search)
    length_penalty: float = 1.0  # beam scores are divided by length ** length_penalty (< 1 favours shorter)
    no_repeat_ngram_size: int = 0  # never generate an n-gram of this size twice in a row's output (0: off)
    temperature: float = 0.0  # > 0: sample (from the beams, with num_beams > 1)

    def __post_init__(self) -> None:
        if self.num_beams < 1:
            raise ValueError(f"num_beams must be at least 1, got {self.num_beams}")
        if self.no_repeat_ngram_size < 0:
            raise ValueError(f"no_repeat_ngram_size must be 0 (off) or more, got {self.no_repeat_ngram_size}")
        if self.temperature < 0:
            raise ValueError(f"temperature must be 0 (greedy) or more, got {self.temperature}")

    def generate_options(self, prompt_length: int) -> dict[str, Any]:
        """transformers' `generate` arguments for prompts padded to `prompt_length` tokens (the length penalty
        only with beam search, the one place it applies; the n-gram ban as `OutputNoRepeatNGram`)."""
        options: dict[str, Any] = {"num_beams": self.num_beams, "do_sample": self.temperature > 0}
        if self.num_beams > 1:
            options["length_penalty"] = self.length_penalty
        if self.no_repeat_ngram_size:
            ban = OutputNoRepeatNGram(self.no_repeat_ngram_size, prompt_length)
            options["logits_processor"] = LogitsProcessorList([ban])
        if self.temperature > 0:
            options["temperature"] = self.temperature
        return options


class OutputNoRepeatNGram(LogitsProcessor):
    """Bans each token that would complete an n-gram already in the row's generated tokens.

    Semantics: for input_ids (rows × length) whose first `prompt_length` columns are the (left-padded) prompts,
    a token t gets score −inf when the last n − 1 generated tokens followed by t occur as n consecutive tokens
    earlier in the generated part. The prompt is not looked at: transformers' own `no_repeat_ngram_size` bans
    n-grams of prompt and output together, so a decoder-only model could not copy a value of four tokens
    from its input (an E2E meaning representation's "5 out of 5" became "5 out of five")."""

    def __init__(self, ngram_size: int, prompt_length: int) -> None:
        self.ban = NoRepeatNGramLogitsProcessor(ngram_size)
        self.prompt_length = prompt_length

    def __call__(self, input_ids: torch.LongTensor, scores: torch.FloatTensor) -> torch.FloatTensor:
        return self.ban(cast(torch.LongTensor, input_ids[:, self.prompt_length :]), scores)


GREEDY = Decoding()


@torch.no_grad()
def generate_texts(
    model: nn.Module,
    tokenizer: PreTrainedTokenizerBase,
    prompts: Sequence[str],
    max_new_tokens: int = 64,
    batch_size: int = 16,
    decoding: Decoding = GREEDY,
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
            prompt_length = enc["input_ids"].shape[1]  # left-padded: every row's new tokens start here
            out = cast(GenerationMixin, model).generate(
                **enc,
                max_new_tokens=max_new_tokens,
                pad_token_id=tokenizer.pad_token_id,
                eos_token_id=tokenizer.eos_token_id,
                synced_gpus=synced,
                **decoding.generate_options(prompt_length),
            )
            new_tokens = out[:, prompt_length:]
            outputs += [t.strip() for t in tokenizer.batch_decode(new_tokens, skip_special_tokens=True)]
    finally:
        tokenizer.padding_side = saved_side
        model.train(was_training)
    return outputs
