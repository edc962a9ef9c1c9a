"""The generation engine on a tiny llama with three random adapters: every sequence's greedy tokens equal
`generate` on its prompt alone with only its adapter active, token for token, when sequences of different
adapters and prompt lengths share the batch, join it while others are half-way, and leave it at different
steps (EOS or max_tokens). Also the row cache's bookkeeping when rows come and go."""

from __future__ import annotations

import pytest
import torch

import lorakit
from lorakit.models import load_model
from lorakit.serve.engine import Engine, Sampling, Sequence
from lorakit.serve.kvcache import RowCache
from support.serving import (
    PROMPTS,
    make_model_and_adapters,
    one_torch_thread,  # noqa: F401  (an autouse fixture)
    reference_tokens,
)


@pytest.fixture(scope="module")
def served(tmp_path_factory):
    model_dir, folders = make_model_and_adapters(tmp_path_factory.mktemp("engine"))
    model, tokenizer = load_model(str(model_dir), "causal-lm")
    for name, folder in folders.items():
        lorakit.load_adapter(model, folder, name=name)
    return model, tokenizer


def run_to_end(engine: Engine, joins: dict[int, list[Sequence]]) -> None:
    """Step the engine; at step i the sequences joins[i] join the batch."""
    step = 0
    while engine.running or any(k >= step for k in joins):
        if step in joins:
            engine.add(joins[step])
        engine.step()
        step += 1


def test_mixed_batches_give_each_adapters_own_greedy_tokens(served):
    model, tokenizer = served
    plan = [  # (adapter, prompt, max_tokens, step at which it joins)
        ("sql", PROMPTS[0], 12, 0),
        ("e2e", PROMPTS[1], 9, 0),
        (None, PROMPTS[2], 12, 0),
        ("chat", PROMPTS[3], 14, 3),
        ("sql", PROMPTS[1], 6, 3),
        ("e2e", PROMPTS[2], 12, 5),
        ("chat", PROMPTS[0], 12, 9),
    ]
    engine = Engine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch_size=6)
    sequences, joins = [], {}
    for adapter, prompt, max_tokens, at in plan:
        seq = Sequence(tokenizer(prompt, add_special_tokens=False).input_ids, adapter, Sampling(max_tokens))
        sequences.append(seq)
        joins.setdefault(at, []).append(seq)
    run_to_end(engine, joins)
    expected = [reference_tokens(model, tokenizer, a, p, n) for a, p, n, _ in plan]
    assert [s.generated for s in sequences] == expected
    assert all(s.finish_reason in ("stop", "length") for s in sequences)
    # The adapters matter: the same prompt gives other tokens under each of them.
    assert len({tuple(reference_tokens(model, tokenizer, a, PROMPTS[0], 12)) for a in (None, "sql", "chat")}) == 3


def test_sampling_is_reproducible_with_a_seed_and_ignore_eos_runs_to_max_tokens(served):
    model, tokenizer = served
    prompt = tokenizer(PROMPTS[0], add_special_tokens=False).input_ids
    runs = []
    for _ in range(2):
        engine = Engine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch_size=2)
        seqs = [
            Sequence(prompt, "sql", Sampling(10, temperature=0.9, top_p=0.8, seed=7, ignore_eos=True)),
            Sequence(prompt, "e2e", Sampling(10, temperature=1.5, seed=8, ignore_eos=True)),
        ]
        run_to_end(engine, {0: seqs})
        runs.append([s.generated for s in seqs])
    assert runs[0] == runs[1]
    assert all(len(tokens) == 10 for tokens in runs[0])
    greedy = reference_tokens(model, tokenizer, "e2e", PROMPTS[0], 10)
    assert runs[0][1] != greedy  # temperature 1.5 departs from the argmax


def test_row_cache_keeps_each_rows_tokens_when_rows_leave_and_join():
    """Rows hold known values (a row's column c holds c + 1000·sequence); after joins, removals, compaction
    and growth every active row still reads exactly its own values in its own columns."""
    cache = RowCache(num_layers=1, max_rows=4)
    contents: dict[int, list[float]] = {}
    order: list[int] = []

    def join(seqs: dict[int, int]) -> None:
        width = max(seqs.values())
        keys = torch.zeros(len(seqs), 1, width, 1)
        for j, (seq, length) in enumerate(seqs.items()):
            contents[seq] = [1000.0 * seq + c for c in range(length)]
            keys[j, 0, width - length :, 0] = torch.tensor(contents[seq])
            order.append(seq)
        cache.add([(keys, keys.clone())], list(seqs.values()))

    def step() -> None:
        cache.reserve(1)
        new = torch.tensor([1000.0 * seq + len(contents[seq]) for seq in order]).view(-1, 1, 1, 1)
        keys, values = cache.write(0, new, new)
        cache.advance()
        for seq in order:
            contents[seq].append(1000.0 * seq + len(contents[seq]))
        mask = cache.attention_mask(0)
        for row, seq in enumerate(order):
            assert keys[row, 0, mask[row].bool(), 0].tolist() == contents[seq]
            assert torch.equal(keys, values)

    def leave(seq: int) -> None:
        row = order.index(seq)
        cache.remove(row)
        last = order.pop()
        if last != seq:
            order[row] = last

    join({1: 3, 2: 5})
    step()
    step()
    join({3: 9})  # longer than the window: the rows move right
    step()
    leave(1)
    for _ in range(30):  # past the capacity: compaction and growth
        step()
    join({4: 2, 5: 4})
    step()
    leave(3)
    leave(5)
    step()
    assert sorted(order) == [2, 4] and cache.rows == 2
    leave(2)
    leave(4)
    assert cache.rows == 0 and cache.end == 0


def test_a_sequence_cancelled_from_the_middle_of_the_batch_leaves_the_others_exact(served):
    """The scheduler removes a cancelled sequence from its own thread, outside the engine's inference mode: moving
    the last row into the freed one must work there, and the others go on exactly as alone."""
    model, tokenizer = served
    engine = Engine(model, tokenizer.eos_token_id, tokenizer.pad_token_id, max_batch_size=3)
    plan = [("sql", PROMPTS[0]), ("e2e", PROMPTS[1]), ("chat", PROMPTS[3])]
    seqs = [
        Sequence(tokenizer(p, add_special_tokens=False).input_ids, a, Sampling(10, ignore_eos=True)) for a, p in plan
    ]
    engine.add(seqs)
    engine.step()
    engine.remove(seqs[0])  # row 0: the last row moves into it
    while engine.running:
        engine.step()
    for (adapter, prompt), seq in zip(plan[1:], seqs[1:]):
        expected = reference_tokens(model, tokenizer, adapter, prompt, 10)
        assert seq.generated[: len(expected)] == expected
