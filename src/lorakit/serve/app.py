"""The HTTP server's assembly (`create_app`): the objects a server shares, the FastAPI app around them, its
lifespan (the batching worker runs while the app runs), error handling, the body-size limit, and the routers.

The routes: `completions.py` (OpenAI-compatible completions, chat completions and the model list),
`monitoring.py` (health, Prometheus metrics) and `admin.py` (loading and unloading adapters). Every route but
`/health` wants the API key when one is configured. A request is checked completely before it is queued — API
key, body size, fields, model name, prompt length, max_tokens against the server's limits and the model's
context (`limits.py`) — so a bad request gets a 4xx answer with an OpenAI-style error body (`errors.py`) and
never reaches the batch that other requests share.
"""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import cast

from fastapi import Depends, FastAPI
from torch import nn
from transformers import PretrainedConfig, PreTrainedTokenizerBase

from . import admin, completions, monitoring
from .config import ServeConfig
from .context import ServeContext
from .engine import Engine
from .errors import install_error_handlers
from .limits import bounded_body, require_key
from .metrics import Metrics
from .registry import Registry
from .scheduler import Scheduler


def create_app(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: ServeConfig, adapters: dict[str, Path] | None = None
) -> FastAPI:
    """The server for `model` with the operator's `adapters` (name → folder) loaded. The scheduler's thread runs
    while the app runs (FastAPI lifespan); `app.state.context` holds everything the server shares, and
    `app.state` also holds its registry, scheduler and metrics by name."""
    context = _build_context(model, tokenizer, config, adapters or {})
    app = FastAPI(title="lorakit serve", lifespan=_lifespan)
    app.state.context = context
    app.state.registry, app.state.scheduler, app.state.metrics = context.registry, context.scheduler, context.metrics
    install_error_handlers(app)
    app.middleware("http")(bounded_body)
    app.include_router(monitoring.health_router)
    for router in (completions.router, monitoring.router, admin.router):
        app.include_router(router, dependencies=[Depends(require_key)])
    return app


def _build_context(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: ServeConfig, adapters: dict[str, Path]
) -> ServeContext:
    registry = Registry(model, config.model_name, config.adapter_dirs, config.unload_timeout_s)
    for name, folder in adapters.items():
        registry.load(name, Path(folder))
    # Padding only fills the left of shorter prompts (masked out), so any token will do without a pad token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    engine = Engine(model, tokenizer.eos_token_id, pad, config.max_batch_size)
    metrics = Metrics()
    scheduler = Scheduler(engine, registry, metrics, config.max_queue, config.batch_wait_ms / 1000)
    text_config = cast(PretrainedConfig, model.config).get_text_config(decoder=True)
    context_length = getattr(text_config, "max_position_embeddings", None)
    return ServeContext(config, tokenizer, registry, scheduler, metrics, context_length, int(time.time()))


@asynccontextmanager
async def _lifespan(app: FastAPI) -> AsyncIterator[None]:
    scheduler = app.state.context.scheduler
    scheduler.start()
    try:
        yield
    finally:
        scheduler.stop()
