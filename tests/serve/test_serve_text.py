"""Streamed text: the pieces of `TextStream` joined equal the tokenizer's decode of all the tokens, with a
byte-level BPE whose multi-byte characters (é, £, emoji, CJK) are split over several tokens and whose words are
merged pieces, whatever the tokens; and each token is decoded from a bounded window of recent tokens (the cost per
token does not grow with the length of the answer)."""

from __future__ import annotations

import random

import pytest

from lorakit.serve.text import TextStream
from support.files import tiny_tokenizer

TEXTS = [
    "Café Adriatic costs more than £30 — 5 out of 5 ★ 🍺🍺 日本語のテキスト",
    "The Vaults is a pub near Café Adriatic with a 5 out of 5 rating.",
    "naïve façade: 😀 🙂 ü ß ø — «quoted» ¿qué?",
]


@pytest.fixture(scope="module")
def tokenizer():
    return tiny_tokenizer(chat=True)


class CountingTokenizer:
    """The tokenizer, counting how many tokens each decode call is given."""

    def __init__(self, tokenizer) -> None:
        self.tokenizer = tokenizer
        self.lengths: list[int] = []

    def decode(self, tokens, **kwargs):
        self.lengths.append(len(tokens))
        return self.tokenizer.decode(tokens, **kwargs)


def streamed(tokenizer, tokens: list[int], stop: list[str] | None = None) -> tuple[list[str], TextStream]:
    stream = TextStream(tokenizer, stop)
    pieces = [stream.push(t) for t in tokens]
    return pieces + [stream.finish()], stream


def test_the_texts_have_split_characters_and_merged_pieces(tokenizer):
    """The premise of the tests below: some tokens decode to part of a character, some to several characters."""
    decoded = [tokenizer.decode([t]) for text in TEXTS for t in tokenizer(text, add_special_tokens=False).input_ids]
    assert any("\ufffd" in piece for piece in decoded)
    assert any(len(piece) >= 3 and "\ufffd" not in piece for piece in decoded)


@pytest.mark.parametrize("text", TEXTS)
def test_pieces_join_to_the_full_decode(tokenizer, text):
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    pieces, _ = streamed(tokenizer, tokens)
    assert "".join(pieces) == text == tokenizer.decode(tokens)
    assert not any(p.endswith("\ufffd") for p in pieces)  # a split character is handed out whole


def test_random_tokens_and_special_tokens_join_to_the_full_decode(tokenizer):
    rng = random.Random(0)
    vocab = len(tokenizer)
    for _ in range(50):
        tokens = [rng.randrange(vocab) for _ in range(rng.randrange(1, 40))]
        pieces, _ = streamed(tokenizer, tokens)
        assert "".join(pieces) == tokenizer.decode(tokens, skip_special_tokens=True)


def test_each_token_is_decoded_from_a_bounded_window(tokenizer):
    tokens = tokenizer(" ".join(TEXTS * 8), add_special_tokens=False).input_ids
    assert len(tokens) > 400
    counting = CountingTokenizer(tokenizer)
    pieces, _ = streamed(counting, tokens)
    assert "".join(pieces) == tokenizer.decode(tokens)
    # a window spans the tokens of the last piece or two: the longest character here takes 4 byte tokens
    assert max(counting.lengths) <= 12
    assert sum(counting.lengths) < 10 * len(tokens)  # linear in the length (re-decoding everything: ~n²/2)


def test_a_stop_string_across_tokens_ends_the_text_before_it(tokenizer):
    text = TEXTS[0]
    tokens = tokenizer(text, add_special_tokens=False).input_ids
    pieces, stream = streamed(tokenizer, tokens, stop=["£30 —"])
    assert "".join(pieces) == text[: text.index("£30 —")] and stream.stopped
