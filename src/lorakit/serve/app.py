"""The HTTP API (FastAPI): OpenAI-compatible completions and chat completions (whole, or streamed as server-sent
events), the model list, health, Prometheus metrics, and admin endpoints that load and unload adapters.

A request is checked completely before it is queued — API key, body size, fields, model name, prompt length,
max_tokens against the server's limits and the model's context — so a bad request gets a 4xx answer with an
OpenAI-style error body and never reaches the batch that other requests share.
"""

from __future__ import annotations

import hmac
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path

from fastapi import APIRouter, Depends, FastAPI, Header, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse, PlainTextResponse, StreamingResponse
from pydantic import BaseModel
from torch import nn
from transformers import PreTrainedTokenizerBase

from . import protocol
from .config import ServeConfig
from .engine import Engine, Sampling
from .generation import Generation, GenerationFailed
from .metrics import Metrics
from .registry import Conflict, Forbidden, ModelNotFound, Registry
from .scheduler import QueueFull, Scheduler


class ApiError(Exception):
    def __init__(self, status: int, message: str, kind: str = "invalid_request_error", code: str | None = None,
                 param: str | None = None) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def _mapped(err: Exception) -> ApiError:
    """The HTTP answer to a library error raised by a request's own input."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, ModelNotFound):
        return ApiError(404, message, code="model_not_found", param="model")
    if isinstance(err, Forbidden):
        return ApiError(403, message, "permission_error")
    if isinstance(err, Conflict):
        return ApiError(409, message, code="conflict")
    if isinstance(err, FileNotFoundError):
        return ApiError(404, message, code="not_found")
    if isinstance(err, QueueFull):
        return ApiError(429, message, "rate_limit_error", code="queue_full")
    return ApiError(400, message)


class LoadAdapter(BaseModel):
    name: str
    path: str


def create_app(model: nn.Module, tokenizer: PreTrainedTokenizerBase, config: ServeConfig,
               adapters: dict[str, Path] | None = None) -> FastAPI:
    """The server for `model` with the operator's `adapters` (name → folder) loaded. The scheduler's thread runs
    while the app runs (FastAPI lifespan); `app.state` holds the registry, scheduler and metrics."""
    registry = Registry(model, config.model_name, config.adapter_dirs, config.unload_timeout_s)
    for name, folder in (adapters or {}).items():
        registry.load(name, Path(folder))
    pad = tokenizer.pad_token_id if tokenizer.pad_token_id is not None else (tokenizer.eos_token_id or 0)
    engine = Engine(model, tokenizer.eos_token_id, pad, config.max_batch_size)
    metrics = Metrics()
    scheduler = Scheduler(engine, registry, metrics, config.max_queue, config.batch_wait_ms / 1000)
    context = getattr(model.config.get_text_config(decoder=True), "max_position_embeddings", None)
    started = int(time.time())

    @asynccontextmanager
    async def lifespan(_: FastAPI):
        scheduler.start()
        try:
            yield
        finally:
            scheduler.stop()

    app = FastAPI(title="lorakit serve", lifespan=lifespan)
    app.state.registry, app.state.scheduler, app.state.metrics = registry, scheduler, metrics

    def error_response(err: ApiError) -> JSONResponse:
        metrics.rejected(err.status)
        return JSONResponse(protocol.error_body(err.message, err.kind, err.code, err.param), status_code=err.status)

    @app.exception_handler(ApiError)
    async def on_api_error(_: Request, err: ApiError) -> JSONResponse:
        return error_response(err)

    @app.exception_handler(RequestValidationError)
    async def on_invalid(_: Request, err: RequestValidationError) -> JSONResponse:
        problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
        return error_response(ApiError(400, f"invalid request: {problems}"))

    @app.middleware("http")
    async def bounded_body(request: Request, call_next):
        if request.method in ("POST", "PUT", "PATCH"):
            length = request.headers.get("content-length")
            if length is None:
                return error_response(ApiError(411, "send the body with a Content-Length header"))
            if not length.isdigit() or int(length) > config.max_body_bytes:
                return error_response(ApiError(413, f"the body is larger than {config.max_body_bytes} bytes"))
        return await call_next(request)

    async def require_key(authorization: str | None = Header(None)) -> None:
        if config.api_key is None:
            return
        scheme, _, token = (authorization or "").partition(" ")
        if scheme.lower() != "bearer" or not hmac.compare_digest(token.encode(), config.api_key.encode()):
            raise ApiError(401, "missing or wrong API key: send 'Authorization: Bearer <key>'",
                           "authentication_error", code="invalid_api_key")

    api = APIRouter(dependencies=[Depends(require_key)])

    # -- generation -------------------------------------------------------------------------------
    def budget(prompt: list[int], requested: int | None) -> int:
        """The request's max_tokens after every limit, or a 400 saying which limit it breaks."""
        if not prompt:
            raise ApiError(400, "the prompt is empty (0 tokens)", param="prompt")
        if len(prompt) > config.max_prompt_tokens:
            raise ApiError(400, f"the prompt has {len(prompt)} tokens; this server accepts at most "
                                f"{config.max_prompt_tokens}", code="prompt_too_long", param="prompt")
        room = context - len(prompt) if context else config.max_tokens
        if room < 1:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) fills the model's context of {context} tokens",
                           code="context_length_exceeded", param="prompt")
        if requested is None:
            return min(config.max_tokens, room)
        if requested > config.max_tokens:
            raise ApiError(400, f"max_tokens={requested} is above this server's limit of {config.max_tokens}",
                           param="max_tokens")
        if requested > room:
            raise ApiError(400, f"the prompt ({len(prompt)} tokens) plus max_tokens={requested} exceeds the model's "
                                f"context of {context} tokens", code="context_length_exceeded", param="max_tokens")
        return requested

    def check_model(body: protocol.RequestBase) -> None:
        if body.model not in registry.model_names():
            raise _mapped(registry.not_found(body.model))

    def start(body: protocol.RequestBase, prompts: list[list[int]], requested: int | None) -> Generation:
        problem = body.unsupported()
        if problem:
            raise ApiError(400, problem)
        if not prompts or len(prompts) > config.max_batch_size:
            raise ApiError(400, f"give 1 to {config.max_batch_size} prompts, got {len(prompts)}", param="prompt")
        max_tokens = min(budget(p, requested) for p in prompts)
        sampling = Sampling(max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed,
                            ignore_eos=body.ignore_eos)
        try:
            return Generation(scheduler, registry, tokenizer, body.model, prompts, sampling, body.stop_strings())
        except (ModelNotFound, QueueFull) as err:
            raise _mapped(err) from None

    async def answer(body: protocol.RequestBase, generation: Generation, chat: bool):
        request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
        if body.stream:
            events = sse(body, generation, chat, request_id)
            return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
        try:
            choices = await generation.collect()
        except GenerationFailed as err:
            raise ApiError(500, str(err), "server_error") from None
        listed = [protocol.choice(i, c.text, c.finish_reason, chat) for i, c in enumerate(choices)]
        use = protocol.usage(generation.prompt_tokens, generation.completion_tokens)
        return protocol.completion_body(request_id, body.model, listed, use, chat)

    async def sse(body: protocol.RequestBase, generation: Generation, chat: bool, request_id: str) -> AsyncIterator[str]:
        def event(choices: list, use: dict | None = None) -> str:
            return f"data: {json.dumps(protocol.completion_body(request_id, body.model, choices, use, chat, True))}\n\n"

        try:
            if chat:  # the role comes first, as OpenAI sends it
                yield event([protocol.choice(i, "", None, chat, True, first=True)
                             for i in range(len(generation.requests))])
            async for index, piece, finish in generation.pieces():
                if piece:
                    yield event([protocol.choice(index, piece, None, chat, True)])
                if finish is not None:
                    yield event([protocol.choice(index, None if chat else "", finish, chat, True)])
            if body.stream_options and body.stream_options.include_usage:
                yield event([], protocol.usage(generation.prompt_tokens, generation.completion_tokens))
        except GenerationFailed as err:
            yield f"data: {json.dumps(protocol.error_body(str(err), 'server_error'))}\n\n"
        yield "data: [DONE]\n\n"

    def encode(text: str) -> list[int]:
        return tokenizer(text, add_special_tokens=False).input_ids

    @api.post("/v1/completions")
    async def completions(body: protocol.CompletionRequest):
        check_model(body)
        prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
        return await answer(body, start(body, [encode(p) for p in prompts], body.max_tokens), chat=False)

    @api.post("/v1/chat/completions")
    async def chat_completions(body: protocol.ChatRequest):
        check_model(body)
        if not tokenizer.chat_template:
            raise ApiError(400, f"model {config.model_name!r} has no chat template; use /v1/completions")
        messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()}
                    for m in body.messages]
        try:
            text = tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True)
        except Exception as err:  # the template's own checks (jinja2 raises its own exception types)
            raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None
        return await answer(body, start(body, [encode(text)], body.token_limit()), chat=True)

    # -- information ------------------------------------------------------------------------------
    @api.get("/v1/models")
    async def models():
        def entry(name: str, parent: str | None) -> dict:
            return {"id": name, "object": "model", "created": started, "owned_by": "lorakit", "root": name,
                    "parent": parent}

        return {"object": "list", "data": [entry(config.model_name, None)]
                + [entry(name, config.model_name) for name in registry.adapters()]}

    @app.get("/health")
    async def health():
        queued, running = scheduler.counts()
        status = "ok" if scheduler.alive else "stopped"
        return JSONResponse({"status": status, "queued": sum(queued.values()), "running": sum(running.values())},
                            status_code=200 if scheduler.alive else 503)

    @api.get("/metrics")
    async def prometheus():
        queued, running = scheduler.counts()
        text = metrics.render(queued, running, registry.model_names())
        return PlainTextResponse(text, media_type="text/plain; version=0.0.4")

    # -- admin ------------------------------------------------------------------------------------
    @api.get("/admin/adapters")
    def list_adapters():
        return {"adapters": [{"name": n, "in_use": count} for n, count in registry.in_use().items()]}

    @api.post("/admin/adapters")
    def load_adapter(body: LoadAdapter):  # a plain def: FastAPI runs it in a worker thread (file reads)
        try:
            registry.load(body.name, registry.allowed_folder(body.path))
        except (ValueError, KeyError, FileNotFoundError, PermissionError, Conflict) as err:
            raise _mapped(err) from None
        return {"loaded": body.name, "models": registry.model_names()}

    @api.delete("/admin/adapters/{name}")
    def unload_adapter(name: str):  # waits (in a worker thread) for the requests that use the adapter
        try:
            registry.unload(name)
        except (ModelNotFound, Conflict) as err:
            raise _mapped(err) from None
        return {"unloaded": name, "models": registry.model_names()}

    app.include_router(api)
    return app
