"""Rows longer than max_length: what truncation keeps (written out token by token), what drop leaves out,
the counts, the error when nothing is left, and the auto max_length."""

import pytest

from lorakit.train.data import DataSplit, Example, encode_causal, encode_prompt
from lorakit.train.encoding import CausalTokens, fit
from lorakit.train.examples import DataError
from lorakit.train.long_rows import auto_max_length, encode_whole, limit_rows, model_context
from support.files import tiny_tokenizer


def test_fit_keeps_the_template_head_the_prompt_end_and_the_target_start():
    prompt, target = list(range(100, 120)), list(range(200, 230))
    row = CausalTokens(prompt, [-100] * 20, target)
    cut = fit(row, max_length=16, head=2)
    # The target takes half (8 of its 30 tokens, from its start); the prompt keeps 2 head tokens and its last 6.
    assert cut.target_ids == target[:8]
    assert cut.prompt_ids == prompt[:2] + prompt[-6:]
    assert cut.prompt_labels == [-100] * 8
    short_prompt = fit(CausalTokens(prompt[:3], [-100] * 3, target), max_length=16)
    assert short_prompt.prompt_ids == prompt[:3] and short_prompt.target_ids == target[:13]  # all the room left
    short_target = fit(CausalTokens(prompt, [-100] * 20, target[:2]), max_length=16, head=2)
    assert short_target.target_ids == target[:2] and short_target.prompt_ids == prompt[:2] + prompt[-12:]
    assert fit(row, max_length=50) == row  # fits: unchanged


def test_a_long_prompt_keeps_its_chat_header_and_its_end():
    tokenizer = tiny_tokenizer(chat=True)
    text = "The Vaults is a pub near Café Adriatic. " * 20
    example = Example(text, "The Vaults.", [])
    row = encode_causal(tokenizer, example, max_length=40)
    assert len(row["input_ids"]) == 40
    header = tokenizer("<|im_start|>user\n", add_special_tokens=False).input_ids
    whole = encode_prompt(tokenizer, text)
    target = tokenizer("The Vaults.", add_special_tokens=False).input_ids + [tokenizer.eos_token_id]
    n_target = len(target)  # shorter than half of 40: kept whole
    assert row["input_ids"] == header + whole[len(whole) - (40 - n_target - len(header)) :] + target
    assert [t for t in row["labels"] if t != -100] == target


def split_of(lengths: list[int]) -> DataSplit:
    """Generation examples whose prompts are `n` words each."""
    return DataSplit("causal-lm", [Example("pub " * n, "ok", ["ok"]) for n in lengths])


@pytest.mark.parametrize("policy", ["truncate", "drop"])
def test_long_rows_are_cut_or_left_out_and_counted(policy):
    tokenizer = tiny_tokenizer()
    split = split_of([2, 3, 40, 2, 60])
    whole = encode_whole(split, tokenizer)
    lengths = [len(row["input_ids"]) for row in whole]
    limit = sorted(lengths)[2]  # the three short rows fit
    kept, rows, report = limit_rows(split, whole, tokenizer, limit, policy)
    assert report.rows == 5
    if policy == "truncate":
        assert (report.truncated, report.dropped) == (2, 0) and len(kept) == 5
        assert [len(r["input_ids"]) for r in rows] == [min(n, limit) for n in lengths]
    else:
        assert (report.truncated, report.dropped) == (0, 2)
        assert kept.examples == [split.examples[i] for i in (0, 1, 3)]
        assert rows == [whole[i] for i in (0, 1, 3)]


def test_a_split_with_no_row_left_is_an_error():
    tokenizer = tiny_tokenizer()
    split = split_of([30, 40])
    whole = encode_whole(split, tokenizer)
    shortest = min(len(row["input_ids"]) for row in whole)
    message = rf"every training row is longer than max_length 5 \(the shortest has {shortest} tokens\)"
    with pytest.raises(DataError, match=message):
        limit_rows(split, whole, tokenizer, 5, "drop")


def test_auto_max_length_is_the_longest_row_within_the_context():
    assert auto_max_length([10, 57, 33], context=None) == 57
    assert auto_max_length([10, 57, 33], context=40) == 40
    assert auto_max_length([10, 5000], context=8192) == 1024

    class Config:
        max_position_embeddings = 128

    class Model:
        config = Config()

    tokenizer = tiny_tokenizer()  # states no limit of its own (a huge model_max_length)
    assert model_context(Model(), tokenizer) == 128
    tokenizer.model_max_length = 64
    assert model_context(Model(), tokenizer) == 64
