"""The OpenAI-compatible routes: `POST /v1/completions`, `POST /v1/chat/completions` and `GET /v1/models`.

A generation request is checked completely (model name, options, prompts, token budget) before its sequences
are queued; then it is answered whole, or streamed (`streaming.py`). The router carries no dependencies of its
own: `create_app` adds the API key check to it.
"""

from __future__ import annotations

from typing import Any, cast

from fastapi import APIRouter
from fastapi.responses import StreamingResponse

from . import protocol
from .context import Context, ServeContext
from .engine import Sampling
from .errors import ApiError, api_error_for
from .generation import Generation, GenerationFailed
from .limits import check_prompt_count, token_budget
from .registry import ModelNotFound
from .scheduler import QueueFull
from .streaming import stream_response

router = APIRouter()


def _check_model(context: ServeContext, body: protocol.RequestBase) -> None:
    if body.model not in context.registry.model_names():
        raise api_error_for(context.registry.not_found(body.model))


def _encode(context: ServeContext, text: str) -> list[int]:
    return context.tokenizer(text, add_special_tokens=False).input_ids


def start_generation(
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
    try:
        return Generation(
            context.scheduler, context.registry, context.tokenizer, body.model, prompts, sampling, body.stop_strings()
        )
    except (ModelNotFound, QueueFull) as err:
        raise api_error_for(err) from None


async def answer(body: protocol.RequestBase, generation: Generation, chat: bool) -> dict[str, Any] | StreamingResponse:
    """The whole completion once generation ends (a 500 if it failed), or the stream of it (`stream: true`)."""
    request_id = protocol.new_id("chatcmpl" if chat else "cmpl")
    if body.stream:
        return stream_response(body, generation, chat, request_id)
    try:
        choices = await generation.collect()
    except GenerationFailed as err:
        raise ApiError(500, str(err), "server_error") from None
    listed = [protocol.choice(i, c.text, c.finish_reason, chat) for i, c in enumerate(choices)]
    use = protocol.usage(generation.prompt_tokens, generation.completion_tokens)
    return protocol.completion_body(request_id, body.model, listed, use, chat)


@router.post("/v1/completions", response_model=None)
async def completions(body: protocol.CompletionRequest, context: Context) -> dict[str, Any] | StreamingResponse:
    """Semantics: each prompt (a string, or a list of them: one choice each) is tokenised as it is, without
    special tokens or a template; `max_tokens` defaults to 16 as in OpenAI's API."""
    _check_model(context, body)
    prompts = [body.prompt] if isinstance(body.prompt, str) else body.prompt
    generation = start_generation(context, body, [_encode(context, p) for p in prompts], body.max_tokens)
    return await answer(body, generation, chat=False)


@router.post("/v1/chat/completions", response_model=None)
async def chat_completions(body: protocol.ChatRequest, context: Context) -> dict[str, Any] | StreamingResponse:
    """Semantics: the messages go through the tokenizer's chat template with the assistant's turn opened (a
    "developer" message is a system message); no template is a 400. Without `max_completion_tokens` or
    `max_tokens`, the answer may be as long as the server's limits allow."""
    _check_model(context, body)
    if not context.tokenizer.chat_template:
        raise ApiError(400, f"model {context.config.model_name!r} has no chat template; use /v1/completions")
    messages = [{"role": "system" if m.role == "developer" else m.role, "content": m.text()} for m in body.messages]
    try:
        text = cast(str, context.tokenizer.apply_chat_template(messages, tokenize=False, add_generation_prompt=True))
    except Exception as err:  # the template's own checks (jinja2 raises its own exception types)
        raise ApiError(400, f"the chat template refused these messages: {err}", param="messages") from None
    generation = start_generation(context, body, [_encode(context, text)], body.token_limit())
    return await answer(body, generation, chat=True)


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
