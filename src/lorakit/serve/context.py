"""`ServeContext`: the objects one server shares between its requests, and how a request reaches them.

`create_app` builds one context and stores it as `app.state.context`. Route handlers take it as the `Context`
dependency; middleware and exception handlers, which FastAPI gives no dependencies, read it with `context_of`.
"""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request
from transformers import PreTrainedTokenizerBase

from .config import ServeConfig
from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler


@dataclass(frozen=True)
class ServeContext:
    """One server's configuration, tokenizer, adapters, batching worker and metrics.

    Args:
        context_length: the model's context in tokens (`max_position_embeddings`), or None when its config
            does not say; prompts plus max_tokens must fit in it.
        started: Unix time of the server's creation (the `created` field of `/v1/models`).
    """

    config: ServeConfig
    tokenizer: PreTrainedTokenizerBase
    registry: Registry
    scheduler: Scheduler
    metrics: Metrics
    context_length: int | None
    started: int


def context_of(request: Request) -> ServeContext:
    """The context of the server that received `request`."""
    return request.app.state.context


async def _request_context(request: Request) -> ServeContext:
    # async so that FastAPI calls it on the event loop rather than in a worker thread
    return context_of(request)


Context = Annotated[ServeContext, Depends(_request_context)]
