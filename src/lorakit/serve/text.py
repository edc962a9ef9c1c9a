"""Generated tokens to text, piece by piece, for streaming: the concatenated pieces are exactly the decoded text
of all the tokens (special tokens skipped), up to the first stop string if one appears.

A piece never ends inside a character that later tokens complete (a decoded "�" at the end is held back), nor
with text that could be the start of a stop string.
"""

from __future__ import annotations

from typing import cast

from transformers import PreTrainedTokenizerBase

REPLACEMENT = "\ufffd"


class TextStream:
    def __init__(self, tokenizer: PreTrainedTokenizerBase, stop: list[str] | None = None) -> None:
        self.tokenizer = tokenizer
        self.stop = [s for s in (stop or []) if s]
        self.tokens: list[int] = []
        self.sent = 0  # characters of the decoded text handed out so far
        self.stopped = False

    def _text(self) -> str:
        return cast(str, self.tokenizer.decode(self.tokens, skip_special_tokens=True))  # one sequence: one string

    def push(self, token: int) -> str:
        """Add a token; returns the text that is now certain (possibly ""). Sets `stopped` at a stop string."""
        if self.stopped:
            return ""
        self.tokens.append(token)
        text = self._text()
        earliest = min(
            (i for i in (text.find(s, max(0, self.sent - len(s) + 1)) for s in self.stop) if i >= 0), default=-1
        )
        if earliest >= 0:
            self.stopped = True
            return self._hand_out(text[:earliest])
        safe = len(text)
        while safe > self.sent and text[safe - 1] == REPLACEMENT:
            safe -= 1
        # Hold back the longest suffix that may still grow into a stop string.
        safe -= max(
            (
                k
                for stop in self.stop
                for k in range(1, min(len(stop) - 1, safe - self.sent) + 1)
                if text[safe - k : safe] == stop[:k]
            ),
            default=0,
        )
        return self._hand_out(text[:safe])

    def finish(self) -> str:
        """At the end of generation: whatever was held back (nothing after a stop string)."""
        return "" if self.stopped else self._hand_out(self._text())

    def _hand_out(self, text: str) -> str:
        piece = text[self.sent :]
        self.sent = max(self.sent, len(text))
        return piece
