"""Generated tokens to text, piece by piece, for streaming: the concatenated pieces are the decoded text of all
the tokens (special tokens skipped), up to the first stop string if one appears.

Decoding is incremental, as vLLM and TGI do it: each new token's text is the decode of a short window of recent
tokens (from `prefix_offset`) minus the decode of that window without the tokens not yet handed out (up to
`read_offset`). The window holds the tokens of the last piece or two, so the cost per token does not grow with
the length of the answer, while a tokenizer that decodes a token differently at the start of a text (a
sentencepiece "▁", a merged space) still gets its context. A piece never ends inside a character that later
tokens complete (a decoded "�" at the end is held back until the character is whole), nor with text that
could be the start of a stop string.
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class IncrementalDecoder:
    """The text of a growing token sequence, one token at a time, from a bounded window of recent tokens."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase) -> None:
        self.tokenizer = tokenizer
        self.tokens: list[int] = []
        self.prefix_offset = 0  # the window starts here: tokens whose text is already handed out, for context
        self.read_offset = 0  # the tokens from here on have not been handed out yet

    def _decode(self, tokens: list[int]) -> str:
        return cast(str, self.tokenizer.decode(tokens, skip_special_tokens=True))  # one sequence: one string

    def push(self, token: int) -> str:
        """Add a token; returns the text it completes ("" while a character is still incomplete)."""
        self.tokens.append(token)
        return self._advance(final=False)

    def flush(self) -> str:
        """At the end: the text of the tokens held back (an incomplete character decodes as "�")."""
        return self._advance(final=True)

    def _advance(self, final: bool) -> str:
        prefix = self._decode(self.tokens[self.prefix_offset : self.read_offset])
        text = self._decode(self.tokens[self.prefix_offset :])
        if len(text) > len(prefix) and (final or not text.endswith(REPLACEMENT)):
            self.prefix_offset, self.read_offset = self.read_offset, len(self.tokens)
            return text[len(prefix) :]
        return ""


class TextStream:
    """One choice's text: tokens in, certain text pieces out, ending at the first stop string."""

    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.decoder = IncrementalDecoder(tokenizer)
        self.stop = [s for s in (stop or []) if s]
        self.text = ""  # the decoded text so far (handed out, or held back for a possible stop string)
        self.sent = 0  # characters of `text` handed out so far
        self.stopped = False

    @property
    def tokens(self) -> list[int]:
        return self.decoder.tokens

    def push(self, token: int) -> str:
        """Add a token; returns the text that is now certain (possibly ""). Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self.text += self.decoder.push(token)
        text = self.text
        earliest = min(
            (i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0), default=-1
        )
        if earliest >= 0:
            self.stopped = True
            return self._hand_out(earliest)
        # Hold back the longest suffix that may still grow into a stop string.
        safe = len(text)
        safe -= max(
            (
                k
                for stop in self.stop
                for k in range(1, min(len(stop) - 1, safe - self.sent) + 1)
                if text[safe - k : safe] == stop[:k]
            ),
            default=0,
        )
        return self._hand_out(safe)

    def finish(self) -> str:
        """At the end of generation: whatever was held back (nothing after a stop string)."""
        if self.stopped:
            return ""
        self.text += self.decoder.flush()
        return self._hand_out(len(self.text))

    def _hand_out(self, end: int) -> str:
        piece = self.text[self.sent : end]
        self.sent = max(self.sent, end)
        return piece
