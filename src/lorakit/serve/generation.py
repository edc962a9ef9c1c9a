"""One API request on the event loop's side: its prompts go to the scheduler as sequences, their tokens come back
as text pieces.

The scheduler's worker thread hands tokens to `emit`, which moves them onto the event loop. `pieces` turns them
into text with a `TextStream` per choice, ends a choice at a stop string (cancelling the rest of its
generation), and cancels whatever is unfinished when the consumer goes away (a client that disconnects).
"""

from __future__ import annotations

import asyncio
import contextlib
from collections.abc import AsyncIterator
from dataclasses import dataclass

from transformers import PreTrainedTokenizerBase

from .engine import Sampling, Sequence
from .registry import Registry
from .scheduler import Request, Scheduler
from .text import TextStream


class GenerationFailed(RuntimeError):
    """The forward pass failed for this request's batch."""


@dataclass
class Choice:
    text: str = ""
    finish_reason: str | None = None


class Generation:
    """The sequences of one API request (one per prompt), all with the same model and sampling."""

    def __init__(
        self,
        scheduler: Scheduler,
        registry: Registry,
        tokenizer: PreTrainedTokenizerBase,
        model: str,
        adapter: str | None,
        prompts: list[list[int]],
        sampling: Sampling,
        stop: list[str],
    ) -> None:
        """Queue one sequence per prompt with `adapter`, which the caller has acquired once per prompt (each
        sequence releases one hold when it ends; those not queued are released here)."""
        self.scheduler = scheduler
        self.prompt_tokens = sum(len(p) for p in prompts)
        self._loop = asyncio.get_running_loop()
        self._events: asyncio.Queue = asyncio.Queue()
        self.streams = [TextStream(tokenizer, stop) for _ in prompts]
        self.requests: list[Request] = []
        cold = not registry.on_model(adapter)
        try:
            for index, prompt in enumerate(prompts):
                request = Request(Sequence(prompt, adapter, sampling), model, self._emitter(index), cold=cold)
                scheduler.submit(request)
                self.requests.append(request)
        except BaseException:
            registry.release(adapter, count=len(prompts) - len(self.requests))
            self.cancel()
            raise

    def _emitter(self, index: int):
        def emit(event: tuple) -> None:
            with contextlib.suppress(RuntimeError):  # the event loop has closed: the server is shutting down
                self._loop.call_soon_threadsafe(self._events.put_nowait, (index, event))

        return emit

    def cancel(self) -> None:
        for request in self.requests:
            self.scheduler.cancel(request)

    async def pieces(self) -> AsyncIterator[tuple[int, str, str | None]]:
        """(choice index, text piece, finish reason or None) as tokens arrive; the last piece of a choice carries
        its finish reason ("stop" or "length")."""
        unfinished = set(range(len(self.requests)))
        try:
            while unfinished:
                index, (kind, value) = await self._events.get()
                if index not in unfinished:
                    continue
                stream = self.streams[index]
                if kind == "token":
                    piece = stream.push(value)
                    if stream.stopped:  # a stop string: the choice ends here
                        unfinished.discard(index)
                        self.scheduler.cancel(self.requests[index], "stop")
                        yield index, piece, "stop"
                    elif piece:
                        yield index, piece, None
                elif kind == "done":
                    unfinished.discard(index)
                    yield index, stream.finish(), value
                else:
                    raise GenerationFailed(value)
        finally:
            for index in unfinished:
                self.scheduler.cancel(self.requests[index])

    async def collect(self) -> list[Choice]:
        choices = [Choice() for _ in self.requests]
        async for index, piece, finish in self.pieces():
            choices[index].text += piece
            choices[index].finish_reason = finish or choices[index].finish_reason
        return choices

    @property
    def completion_tokens(self) -> int:
        return sum(len(s.tokens) for s in self.streams)
