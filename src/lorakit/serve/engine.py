"""Batched token generation for many sequences at once, each with its own adapter (or none).

The engine runs the sequences that the scheduler hands it. New sequences are prefilled together (left-padded,
their positions counted from their own first token, so padding changes nothing), join the running batch
through the row cache (`RowCache`: the KV cache of every sequence in its own row), and from then on every
`step` feeds each running sequence its last token, in one forward pass for the whole batch. Each forward runs
under `lorakit.adapter_rows`, so a row computes exactly what its adapter alone would: a sequence's greedy output
is the one `lorakit generate` gives with that adapter only. A sequence leaves when it produces the EOS token or
reaches its `max_tokens`.

No threads and no locks here: the scheduler calls `add`, `step` and `remove` from one thread.
"""

from __future__ import annotations

import inspect
import secrets
from contextlib import nullcontext
from dataclasses import dataclass, field
from typing import cast

import torch
from torch import nn
from transformers import DynamicCache, PretrainedConfig

from ..mixed import adapter_rows
from ..state import adapter_names
from .kvcache import RowCache


@dataclass(frozen=True)
class Sampling:
    """How one sequence chooses its tokens. temperature 0 is greedy decoding."""

    max_tokens: int
    temperature: float = 0.0
    top_p: float = 1.0
    seed: int | None = None
    ignore_eos: bool = False  # generate exactly max_tokens tokens (benchmarks)


@dataclass(eq=False)
class Sequence:
    prompt: list[int]
    adapter: str | None
    sampling: Sampling
    generated: list[int] = field(default_factory=list)
    finish_reason: str | None = None  # "stop" (EOS) or "length"
    generator: torch.Generator | None = None


class Engine:
    """Runs up to `max_batch_size` sequences of `model` together (a causal LM with a standard KV cache)."""

    def __init__(self, model: nn.Module, eos_token_id: int | None, pad_token_id: int, max_batch_size: int) -> None:
        config = cast(PretrainedConfig, model.config)  # a transformers model; nn.Module's typing has no .config
        if getattr(config, "sliding_window", None) or any(
            t != "full_attention" for t in getattr(config, "layer_types", None) or []
        ):
            raise ValueError(
                "lorakit serve supports models with full attention in every layer, "
                f"not the sliding-window or hybrid attention of {type(model).__name__}"
            )
        self.model = model.eval()
        self.eos_token_id = eos_token_id
        self.pad_token_id = pad_token_id
        self.max_batch_size = max_batch_size
        self.device = next(model.parameters()).device
        # transformers renamed the forward's cache argument (past_key_values → cache) within 5.x.
        params = inspect.signature(type(model).forward).parameters
        self._cache_arg = "cache" if "cache" in params else "past_key_values"
        self.rows = RowCache(config.get_text_config(decoder=True).num_hidden_layers, max_batch_size)
        self.running: list[Sequence] = []

    @property
    def free_rows(self) -> int:
        return self.max_batch_size - len(self.running)

    def _forward(self, adapters: list[str | None], **inputs) -> torch.Tensor:
        # Rows without an adapter must not run the model's active adapters either.
        with adapter_rows(self.model, adapters) if adapter_names(self.model) else nullcontext():
            return self.model(**inputs, use_cache=True, logits_to_keep=1).logits[:, -1, :]

    @torch.inference_mode()
    def add(self, sequences: list[Sequence]) -> list[tuple[Sequence, int]]:
        """Prefill new sequences and let them join the batch; returns each one's first token (finished ones have
        left again)."""
        if len(sequences) > self.free_rows:
            raise ValueError(f"{len(sequences)} sequences do not fit the {self.free_rows} free rows")
        lengths = [len(s.prompt) for s in sequences]
        width = max(lengths)
        ids = torch.full((len(sequences), width), self.pad_token_id, dtype=torch.long)
        mask = torch.zeros((len(sequences), width), dtype=torch.long)
        for row, seq in enumerate(sequences):
            ids[row, width - len(seq.prompt) :] = torch.tensor(seq.prompt)
            mask[row, width - len(seq.prompt) :] = 1
        positions = (mask.cumsum(-1) - 1).clamp(min=0)
        cache = DynamicCache()
        logits = self._forward(
            [s.adapter for s in sequences],
            input_ids=ids.to(self.device),
            attention_mask=mask.to(self.device),
            position_ids=positions.to(self.device),
            **{self._cache_arg: cache},
        )
        # Every layer is a full-attention DynamicLayer (checked in __init__), filled by this forward pass.
        self.rows.add([(layer.keys, layer.values) for layer in cache.layers], lengths)  # type: ignore[union-attr,misc]
        self.running += sequences
        for seq in sequences:
            if seq.sampling.temperature > 0:
                seed = seq.sampling.seed if seq.sampling.seed is not None else secrets.randbits(63)
                seq.generator = torch.Generator(device=self.device).manual_seed(seed)
        return self._advance(sequences, logits)

    @torch.inference_mode()
    def step(self) -> list[tuple[Sequence, int]]:
        """One token for every running sequence."""
        if not self.running:
            return []
        self.rows.reserve(1)
        last = torch.tensor([[s.generated[-1]] for s in self.running], device=self.device)
        positions = torch.tensor([[len(s.prompt) + len(s.generated) - 1] for s in self.running], device=self.device)
        logits = self._forward(
            [s.adapter for s in self.running],
            input_ids=last,
            attention_mask=self.rows.attention_mask(),
            position_ids=positions,
            **{self._cache_arg: self.rows.as_cache()},
        )
        self.rows.advance()
        return self._advance(list(self.running), logits)

    def _advance(self, sequences: list[Sequence], logits: torch.Tensor) -> list[tuple[Sequence, int]]:
        tokens = choose_tokens(logits, sequences)
        for seq, token in zip(sequences, tokens, strict=True):
            seq.generated.append(token)
            if token == self.eos_token_id and not seq.sampling.ignore_eos:
                seq.finish_reason = "stop"
            elif len(seq.generated) >= seq.sampling.max_tokens:
                seq.finish_reason = "length"
            if seq.finish_reason is not None:
                self.remove(seq)
        return list(zip(sequences, tokens, strict=True))

    @torch.inference_mode()  # the row cache's tensors are inference tensors: moving a row writes into them
    def remove(self, sequence: Sequence) -> None:
        """Take a sequence out of the batch (finished, or cancelled by its client)."""
        row = next((i for i, s in enumerate(self.running) if s is sequence), None)
        if row is None:
            return
        self.rows.remove(row)
        last = self.running.pop()
        if last is not sequence:
            self.running[row] = last

    def clear(self) -> list[Sequence]:
        """Drop every running sequence (after a failed forward pass); returns them."""
        dropped, self.running = self.running, []
        self.rows.clear()
        return dropped


def choose_tokens(logits: torch.Tensor, sequences: list[Sequence]) -> list[int]:
    """Each row's next token: the argmax for greedy rows, a draw (temperature, nucleus top_p) for the others."""
    tokens = logits.argmax(dim=-1).tolist()
    for row, seq in enumerate(sequences):
        sampling = seq.sampling
        if sampling.temperature <= 0:
            continue
        probs = torch.softmax(logits[row].float() / sampling.temperature, dim=-1)
        if sampling.top_p < 1.0:
            sorted_probs, order = probs.sort(descending=True)
            # keep the smallest prefix whose mass reaches top_p (always at least the most likely token)
            outside = sorted_probs.cumsum(-1) - sorted_probs >= sampling.top_p
            probs = torch.zeros_like(probs).scatter_(0, order, sorted_probs.masked_fill(outside, 0.0))
        tokens[row] = int(torch.multinomial(probs, 1, generator=seq.generator))
    return tokens
