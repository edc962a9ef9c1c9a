"""Continuous batching: one worker thread feeds queued requests into the engine's running batch.

Requests wait in a bounded FIFO queue (`max_queue`; a full queue refuses new requests at once). The worker
loops: it drops cancelled requests, admits as many queued requests as the batch has free rows (prefilled
together), then runs one decode step for every running sequence, and hands each new token to its request.
Sequences join and leave between any two steps, so a short request never waits for a long one. When the batch
is empty, the worker waits up to `wait` seconds after the first arrival so that requests arriving together are
prefilled together. Each iteration holds the registry's lock, so adapters are loaded and unloaded only between
forward passes. A queued request whose adapter is not on the model is admitted once the registry has put it
there (making room by moving an idle adapter to host memory); until there is room, the requests behind it that
can run are admitted first.

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
    cold: bool = False  # its adapter was not on the model when it was queued: it waits for a load
    running: bool = False  # admitted to the batch
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
            self.registry.tidy()
            with self._cond:
                cancelled, self._cancelled = self._cancelled, []
                for request, _ in cancelled:
                    if request in self._queue:
                        self._queue.remove(request)
                waiting = list(self._queue)
            admitted = self._admit(waiting)
            try:
                for request, outcome in cancelled:
                    self.engine.remove(request.sequence)
                    self._finish(request, outcome, silent=True)
                if admitted:
                    events += self.engine.add([r.sequence for r in admitted])
                events += self.engine.step()
            except Exception as err:  # a failed forward pass: fail this batch, keep serving
                logger.exception("generation failed")
                for request, outcome in cancelled:
                    self._finish(request, outcome, silent=True)
                for sequence in self.engine.clear():
                    self._finish(self._by_sequence[sequence], "error", f"generation failed: {err}")
                for request in admitted:
                    self._finish(request, "error", f"generation failed: {err}")
                return
        self._dispatch(events)
        if waiting and not admitted and not self.engine.running:
            with self._cond:  # nothing can run until a request ends or arrives: do not spin
                self._cond.wait(0.05)

    def _admit(self, waiting: list[Request]) -> list[Request]:
        """The queued requests that join the batch now, in queue order: as many as there are free rows, each
        once its adapter is on the model (the registry loads it, if there is room)."""
        admitted: list[Request] = []
        failed: list[tuple[Request, Exception]] = []
        for request in waiting:
            if len(admitted) == self.engine.free_rows:
                break
            try:
                if self.registry.start(request.sequence.adapter):
                    admitted.append(request)
            except Exception as err:  # its adapter could not be put on the model: fail it, keep serving
                logger.exception("loading adapter %s failed", request.model)
                failed.append((request, err))
        now = time.monotonic()
        with self._cond:
            for request in admitted + [r for r, _ in failed]:
                self._queue.remove(request)
            for request in admitted:
                self._by_sequence[request.sequence] = request
                request.running = True
        for request, problem in failed:
            self._finish(request, "error", f"adapter {request.model!r} could not be loaded: {problem}")
        for request in admitted:
            if request.cold:
                self.metrics.adapter_waited(request.model, now - request.submitted)
        return admitted

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
        self.registry.release(request.sequence.adapter, running=request.running)
        self.metrics.finished(
            request.model, outcome, len(request.sequence.prompt), time.monotonic() - request.submitted
        )
        if silent:
            return
        request.emit(("error", message) if outcome == "error" else ("done", outcome))
