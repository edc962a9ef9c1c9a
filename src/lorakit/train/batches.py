"""Which examples each micro-batch of a run holds, and in which order: a seeded permutation per epoch
(epoch e draws from `seed + e`), optionally grouped by length, cut into micro-batches that never cross an
epoch boundary. The same settings always give the same plan, so a resumed run continues it exactly."""

from __future__ import annotations

import itertools
from collections.abc import Iterator, Sequence

import torch

from .settings import LoopSettings

GROUP_BATCHES = 50  # batches per length-sorted group (as transformers' group_by_length)


def _grouped_by_length(
    order: list[int], lengths: Sequence[int], batch_size: int, generator: torch.Generator
) -> list[int]:
    """`order` with each run of GROUP_BATCHES batches sorted by length, its batches then shuffled: batches of
    similar lengths (little padding) that still come in random order."""
    span = batch_size * GROUP_BATCHES
    out: list[int] = []
    for begin in range(0, len(order), span):
        group = sorted(order[begin : begin + span], key=lambda i: lengths[i], reverse=True)
        batches = [group[i : i + batch_size] for i in range(0, len(group), batch_size)]
        out += [i for b in torch.randperm(len(batches), generator=generator).tolist() for i in batches[b]]
    return out


def micro_batches(
    num_examples: int, settings: LoopSettings, start_step: int, lengths: Sequence[int] | None = None
) -> list[tuple[int, list[int]]]:
    """Every (optimizer step, example indices) micro-batch from `start_step` on, in the seeded order.

    Batches never cross an epoch boundary; the last batch of an epoch may be smaller. With `lengths`, each
    micro-batch holds examples of similar length (see `_grouped_by_length`).
    """
    total = settings.total_steps(num_examples)
    out: list[tuple[int, list[int]]] = []
    step, micro, epoch = 0, 0, 0
    while step < total:
        generator = torch.Generator().manual_seed(settings.seed + epoch)
        order = torch.randperm(num_examples, generator=generator).tolist()
        if lengths is not None:
            order = _grouped_by_length(order, lengths, settings.batch_size, generator)
        for begin in range(0, num_examples, settings.batch_size):
            if step >= start_step:
                out.append((step, order[begin : begin + settings.batch_size]))
            micro += 1
            if micro % settings.grad_accum == 0:
                step += 1
                if step >= total:
                    break
        epoch += 1
    return out


def feature_batches(features: Sequence[dict], settings: LoopSettings, start_step: int) -> list[tuple[int, list[int]]]:
    """`micro_batches` over encoded `features` as the training loop takes them: grouped by the length of their
    input_ids when `settings.group_by_length`."""
    lengths = [len(f["input_ids"]) for f in features] if settings.group_by_length else None
    return micro_batches(len(features), settings, start_step, lengths)


def by_step(plan: Sequence[tuple[int, list[int]]]) -> Iterator[tuple[int, list[list[int]]]]:
    """The plan's micro-batches grouped by optimizer step: (step, [indices of each micro-batch])."""
    for step, batches in itertools.groupby(plan, key=lambda pair: pair[0]):
        yield step, [indices for _, indices in batches]
