"""The OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` and `GET /v1/models`.

A generation request is checked completely (model name, options, prompts, token budget) before its sequences
are queued; then it is answered whole, or streamed (`streaming.py`). Tokenising and chat templating run in
worker threads, off the event loop. A client that disconnects cancels its generation, streamed or not. The
router carries no dependencies of its own: `create_app` adds the API key check to it.
"""

from __future__ import annotations

import asyncio
from typing import Any, cast

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse, StreamingResponse
from starlette.concurrency import run_in_threadpool

from . import protocol
from .context import Context, ServeContext
from .engine import Sampling
from .errors import ApiError, api_error_for
from .generation import Choice, Generation, GenerationFailed
from .limits import check_prompt_count, token_budget
from .registry import ModelNotFound
from .scheduler import QueueFull
from .streaming import stream_response

router = APIRouter()


def _check_model(context: ServeContext, body: protocol.RequestBase) -> None:
    if not context.registry.may_serve(body.model):
        raise api_error_for(context.registry.not_found(body.model))


def _encode(context: ServeContext, texts: list[str]) -> list[list[int]]:
    # Called in a worker thread (run_in_threadpool): tokenising a long prompt must not hold up the event loop.
    return [context.tokenizer(text, add_special_tokens=False).input_ids for text in texts]


def _chat_prompt(context: ServeContext, messages: list[dict[str, str]]) -> list[list[int]]:
    """The templated, tokenised chat (in a worker thread, like `_encode`), or a 400 if the template refuses it."""
    try:
        text = cast(str, context.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as err:  # the template's own checks (jinja2 raises its own exception types)
        raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None
    return _encode(context, [text])


async def start_generation(
    context: ServeContext, body: protocol.RequestBase, prompts: list[list[int]], requested: int | None
) -> Generation:
    """Check the request's options, prompts and token budget, then queue one sequence per prompt."""
    problem = body.unsupported()
    if problem:
        raise ApiError(400, problem)
    check_prompt_count(len(prompts), context.config)
    # One budget for all of the request's prompts: the tightest one.
    max_tokens = min(token_budget(p, requested, context.config, context.context_length) for p in prompts)
    sampling = Sampling(
        max_tokens, temperature=body.temperature, top_p=body.top_p, seed=body.seed, ignore_eos=body.ignore_eos
    )
    registry = context.registry
    try:
        # in a worker thread: an adapter loaded on first use, or dropped from host memory, is read from disk
        adapter = await run_in_threadpool(registry.acquire, body.model, len(prompts))
    except (ModelNotFound, PermissionError, FileNotFoundError, ValueError) as err:
        raise api_error_for(err) from None
    try:
        return Generation(
            context.scheduler, registry, context.tokenizer, body.model, adapter, prompts, sampling, body.stop_strings()
        )
    except QueueFull as err:
        raise api_error_for(err) from None


async def _disconnection(request: Request) -> None:
    """Returns when the client has gone (the request's body is read by then, so only that message is left)."""
    while (await request.receive())["type"] != "http.disconnect":
        pass


async def _collect_while_connected(request: Request, generation: Generation) -> list[Choice] | None:
    """The generation's choices, or None (its sequences cancelled, their rows freed) if the client goes first."""
    collecting = asyncio.ensure_future(generation.collect())
    watching = asyncio.ensure_future(_disconnection(request))
    try:
        await asyncio.wait({collecting, watching}, return_when=asyncio.FIRST_COMPLETED)
    finally:
        watching.cancel()
        if not collecting.done():
            collecting.cancel()
            generation.cancel()  # also when the collecting task was cancelled before it started
    return collecting.result() if collecting.done() and not collecting.cancelled() else None


async def answer(
    request: Request, body: protocol.RequestBase, generation: Generation, chat: bool
) -> dict[str, Any] | StreamingResponse | JSONResponse:
    """The whole completion once generation ends (a 500 if it failed), or the stream of it (`stream: true`).
    Generation stops when the client disconnects, streamed or not."""
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return stream_response(body, generation, chat, request_id)
    try:
        choices = await _collect_while_connected(request, generation)
    except GenerationFailed as err:
        raise ApiError(500, str(err), "server_error") from None
    if choices is None:  # nobody reads this answer; 499 as nginx logs a client that closed the connection
        return JSONResponse(protocol.error_body("the client disconnected", "cancelled"), status_code=499)
    listed = [protocol.choice(i, c.text, c.finish_reason, chat) for i, c in enumerate(choices)]
    use = protocol.usage(generation.prompt_tokens, generation.completion_tokens)
    return protocol.completion_body(request_id, body.model, listed, use, chat)


@router.post("/v1/completions", response_model=None)
async def completions(
    request: Request, body: protocol.CompletionRequest, context: Context
) -> dict[str, Any] | StreamingResponse | JSONResponse:
    """Semantics: each prompt (a string, or a list of them: one choice each) is tokenised as it is, without
    special tokens or a template; `max_tokens` defaults to 16 as in OpenAI's API."""
    _check_model(context, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    encoded = await run_in_threadpool(_encode, context, prompts)
    generation = await start_generation(context, body, encoded, body.max_tokens)
    return await answer(request, body, generation, chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(
    request: Request, body: protocol.ChatRequest, context: Context
) -> dict[str, Any] | StreamingResponse | JSONResponse:
    """Semantics: the messages go through the tokenizer's chat template with the assistant's turn opened (a
    "developer" message is a system message); no template is a 400. Without `max_completion_tokens` or
    `max_tokens`, the answer may be as long as the server's limits allow."""
    _check_model(context, body)
    if not context.tokenizer.chat_template:
        raise ApiError(400, f"model {context.config.model_name!r} has no chat template; use /v1/completions")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    prompts = await run_in_threadpool(_chat_prompt, context, messages)
    generation = await start_generation(context, body, prompts, body.token_limit())
    return await answer(request, body, generation, chat=True)


@router.get("/v1/models", response_model=None)
async def models(context: Context) -> dict[str, Any]:
    """Semantics: the base model first (no parent), then every loaded adapter with the base model as parent."""

    def entry(name: str, parent: str | None) -> dict[str, Any]:
        return {
            "id": name,
            "object": "model",
            "created": context.started,
            "owned_by": "lorakit",
            "root": name,
            "parent": parent,
        }

    base = context.config.model_name
    return {"object": "list", "data": [entry(base, None)] + [entry(name, base) for name in context.registry.adapters()]}
