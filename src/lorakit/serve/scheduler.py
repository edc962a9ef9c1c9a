"""Continuous batching: one worker thread feeds queued requests into the engine's running batch.

Requests wait in a bounded FIFO queue (`max_queue`; a full queue refuses new requests at once). The worker
loops: it drops cancelled requests, admits as many queued requests as the batch has free rows (prefilled
together), then runs one decode step for every running sequence, and hands each new token to its request.
Sequences join and leave between any two steps, so a short request never waits for a long one. When the batch
is empty, the worker waits up to `wait` seconds after the first arrival so that requests arriving together are
prefilled together. Each iteration holds the registry's lock, so adapters are loaded and unloaded only between
forward passes.

Tokens reach a request through its `emit` callback, called on the worker thread: a token, then ("done",
finish_reason), or ("error", message) if the forward pass failed (the other requests of that batch get the
error too; the worker carries on with the next requests).
"""

from __future__ import annotations

import logging
import threading
import time
from collections import Counter, deque
from collections.abc import Callable
from dataclasses import dataclass, field

from .engine import Engine, Sequence
from .metrics import Metrics
from .registry import Registry

logger = logging.getLogger(__name__)


class QueueFull(RuntimeError):
    """The queue holds `max_queue` requests already."""


@dataclass(eq=False)
class Request:
    sequence: Sequence
    model: str  # the name the client asked for: the base model or the adapter
    emit: Callable[[tuple], None]  # ("token", id) | ("done", finish_reason) | ("error", message)
    submitted: float = field(default_factory=time.monotonic)
    done: bool = False


class Scheduler:
    def __init__(self, engine: Engine, registry: Registry, metrics: Metrics, max_queue: int, wait: float) -> None:
        self.engine = engine
        self.registry = registry
        self.metrics = metrics
        self.max_queue = max_queue
        self.wait = wait
        self._cond = threading.Condition()
        self._queue: deque[Request] = deque()
        self._cancelled: list[tuple[Request, str]] = []
        self._by_sequence: dict[Sequence, Request] = {}
        self._stopping = False
        self._thread: threading.Thread | None = None

    # -- client side ------------------------------------------------------------------------------
    def submit(self, request: Request) -> None:
        """Queue a request whose adapter the caller has acquired from the registry (released when it ends)."""
        with self._cond:
            if self._stopping:
                raise QueueFull("the server is shutting down")
            if len(self._queue) >= self.max_queue:
                raise QueueFull(f"the queue is full ({self.max_queue} requests waiting); retry later")
            self._queue.append(request)
            self._cond.notify()

    def cancel(self, request: Request, outcome: str = "cancelled") -> None:
        """Stop a request: its client left, or (outcome "stop") a stop string ended it. It emits nothing more."""
        with self._cond:
            if not request.done:
                self._cancelled.append((request, outcome))
                self._cond.notify()

    def counts(self) -> tuple[dict[str, int], dict[str, int]]:
        """(queued, running) sequences per model name."""
        with self._cond:
            queued = Counter(r.model for r in self._queue)
            running = Counter(r.model for r in self._by_sequence.values())
        return dict(queued), dict(running)

    # -- the worker -------------------------------------------------------------------------------
    @property
    def alive(self) -> bool:
        return self._thread is not None and self._thread.is_alive()

    def start(self) -> None:
        self._thread = threading.Thread(target=self._run, name="lorakit-scheduler", daemon=True)
        self._thread.start()

    def stop(self) -> None:
        with self._cond:
            self._stopping = True
            self._cond.notify()
        if self._thread is not None:
            self._thread.join()
        with self._cond:
            left = list(self._queue) + list(self._by_sequence.values())
            self._queue.clear()
        for request in left:
            self._finish(request, "error", "the server is shutting down")

    def _run(self) -> None:
        while True:
            with self._cond:
                while not (self._stopping or self._queue or self._cancelled or self.engine.running):
                    self._cond.wait()
                if self._stopping:
                    return
                if not self.engine.running:
                    # Nothing is running: give requests arriving together a moment to share the prefill.
                    deadline = time.monotonic() + self.wait
                    while len(self._queue) < self.engine.free_rows and not self._stopping:
                        left = deadline - time.monotonic()
                        if left <= 0:
                            break
                        self._cond.wait(left)
            self._iterate()

    def _iterate(self) -> None:
        events: list[tuple[Sequence, int]] = []
        with self.registry.lock:
            with self._cond:
                cancelled, self._cancelled = self._cancelled, []
                for request, _ in cancelled:
                    if request in self._queue:
                        self._queue.remove(request)
                admitted = [self._queue.popleft() for _ in range(min(len(self._queue), self.engine.free_rows))]
                for request in admitted:
                    self._by_sequence[request.sequence] = request
            for request, outcome in cancelled:
                self.engine.remove(request.sequence)
                self._finish(request, outcome, silent=True)
            try:
                if admitted:
                    events += self.engine.add([r.sequence for r in admitted])
                events += self.engine.step()
            except Exception as err:  # a failed forward pass: fail this batch, keep serving
                logger.exception("generation failed")
                for sequence in self.engine.clear():
                    self._finish(self._by_sequence[sequence], "error", f"generation failed: {err}")
                for request in admitted:
                    self._finish(request, "error", f"generation failed: {err}")
                return
        self._dispatch(events)

    def _dispatch(self, events: list[tuple[Sequence, int]]) -> None:
        tokens: Counter[str] = Counter()
        for sequence, token in events:
            request = self._by_sequence.get(sequence)
            if request is None or request.done:
                continue
            tokens[request.model] += 1
            request.emit(("token", token))
            if sequence.finish_reason is not None:
                self._finish(request, sequence.finish_reason)
        for model, count in tokens.items():
            self.metrics.tokens(model, count)

    def _finish(self, request: Request, outcome: str, message: str | None = None, silent: bool = False) -> None:
        with self._cond:
            if request.done:
                return
            request.done = True
            self._by_sequence.pop(request.sequence, None)
        self.registry.release(request.sequence.adapter)
        self.metrics.finished(
            request.model, outcome, len(request.sequence.prompt), time.monotonic() - request.submitted
        )
        if silent:
            return
        request.emit(("error", message) if outcome == "error" else ("done", outcome))
