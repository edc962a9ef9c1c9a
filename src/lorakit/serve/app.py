"""The HTTP server's assembly (`create_app`): the objects a server shares, the FastAPI app around them, its
lifespan (the batching worker runs while the app runs), error handling, the body-size limit, and the routers.

The routes: `completions.py` (OpenAI-compatible completions, chat completions and the model list),
`monitoring.py` (health, Prometheus metrics), `admin.py` (loading, reloading and unloading adapters) and, with
`docs`, `docs.py` (the API's documentation). Every route but `/health` and the admin API wants the API key when
one is configured; the admin API wants the admin key, and is off without one. A request is checked completely
before it is queued — API key, body size, fields, model name, prompt length, max_tokens against the server's
limits and the model's context (`limits.py`) — so a bad request gets a 4xx answer with an OpenAI-style error
body (`errors.py`) and never reaches the batch that other requests share.
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
from .docs import docs_router
from .engine import Engine
from .errors import install_error_handlers
from .limits import BoundedBody, require_admin_key, require_key
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
    # FastAPI's own documentation routes would be open to everyone: off, and `docs.py` serves them on request.
    app = FastAPI(title="lorakit serve", lifespan=_lifespan, docs_url=None, redoc_url=None, openapi_url=None)
    app.state.context = context
    app.state.registry, app.state.scheduler, app.state.metrics = context.registry, context.scheduler, context.metrics
    install_error_handlers(app)
    app.add_middleware(BoundedBody)
    app.include_router(monitoring.health_router)
    for router in (completions.router, monitoring.router):
        app.include_router(router, dependencies=[Depends(require_key)])
    app.include_router(admin.router, dependencies=[Depends(require_admin_key)])
    if config.docs:
        app.include_router(docs_router(app), dependencies=[Depends(require_key)])
    return app


def _build_context(
    model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: ServeConfig, adapters: dict[str, Path]
) -> ServeContext:
    metrics = Metrics()
    registry = Registry(
        model,
        config.model_name,
        config.adapter_dirs,
        config.unload_timeout_s,
        metrics=metrics,
        max_loaded=config.max_loaded_adapters,
        max_host=config.max_cpu_adapters,
        pinned=config.pinned,
        auto_load=config.auto_load,
    )
    for name in config.pinned:  # first, so that the others take the room left
        if name in adapters:
            registry.load(name, Path(adapters[name]))
        elif registry.roots:
            registry.load_allowed(name, name)
        else:
            raise ValueError(f"pinned adapter {name!r} is neither named with --adapter nor in an --adapter-dir")
    for name, folder in adapters.items():
        if name not in config.pinned:
            registry.load(name, Path(folder))
    # Padding only fills the left of shorter prompts (masked out), so any token will do without a pad token.
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    engine = Engine(model, tokenizer.eos_token_id, pad, config.max_batch_size)
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
