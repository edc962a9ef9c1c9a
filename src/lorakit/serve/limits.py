"""What a request must satisfy before it is queued: the API key (the admin key for the admin API), the body
size, the number of prompts, and each prompt's length and token budget against the server's limits and the
model's context.

Each check raises `ApiError` (or answers at once, for the body size) with the limit it breaks, so that a bad
request never reaches the batch that other requests share.
"""

from __future__ import annotations

import hmac

from fastapi import Header, Request
from starlette.types import ASGIApp, Receive, Scope, Send

from .config import ServeConfig
from .context import Context, context_of
from .errors import ApiError, error_response


def _bearer_matches(authorization: str | None, key: str) -> bool:
    scheme, _, token = (authorization or "").partition(" ")
    # compare_digest: the time taken must not tell how much of a guessed key is right
    return scheme.lower() == "bearer" and hmac.compare_digest(token.encode(), key.encode())


async def require_key(context: Context, authorization: str | None = Header(None)) -> None:
    """Router dependency: with an API key configured, the request must send `Authorization: Bearer <key>`."""
    key = context.config.api_key
    if key is not None and not _bearer_matches(authorization, key):
        raise ApiError(
            401,
            "missing or wrong API key: send 'Authorization: Bearer <key>'",
            "authentication_error",
            code="invalid_api_key",
        )


async def require_admin_key(context: Context, authorization: str | None = Header(None)) -> None:
    """Router dependency of the admin API: off (403) without an admin key; with one, the request must send
    `Authorization: Bearer <admin key>` (401). The client API key does not open it."""
    key = context.config.admin_key
    if key is None:
        raise ApiError(403, "the admin API is off; start the server with --admin-key to use it", "permission_error")
    if not _bearer_matches(authorization, key):
        raise ApiError(
            401,
            "missing or wrong admin key: send 'Authorization: Bearer <admin key>'",
            "authentication_error",
            code="invalid_api_key",
        )


class BoundedBody:
    """ASGI middleware: a request with a body must declare its length (411), at most `max_body_bytes` (413).

    A middleware rather than a dependency, because FastAPI reads the body before it solves dependencies; a plain
    ASGI one (not Starlette's `BaseHTTPMiddleware`), so that the routes see the client's own `receive` channel
    and with it the client's disconnection."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] == "http" and scope["method"] in ("POST", "PUT", "PATCH"):
            request = Request(scope)
            limit = context_of(request).config.max_body_bytes
            length = request.headers.get("content-length")
            problem = None
            if length is None:
                problem = ApiError(411, "send the body with a Content-Length header")
            elif not length.isdigit() or int(length) > limit:
                problem = ApiError(413, f"the body is larger than {limit} bytes")
            if problem is not None:
                await error_response(request, problem)(scope, receive, send)
                return
        await self.app(scope, receive, send)


def check_prompt_count(count: int, config: ServeConfig) -> None:
    """One request's prompts become that many rows of the batch: 1 to `max_batch_size`."""
    if not count or count > config.max_batch_size:
        raise ApiError(400, f"give 1 to {config.max_batch_size} prompts, got {count}", param="prompt")


def token_budget(prompt: list[int], requested: int | None, config: ServeConfig, context_length: int | None) -> int:
    """The request's max_tokens for `prompt` after every limit, or a 400 saying which limit it breaks.

    Semantics: without `requested`, the answer is as long as the server's `max_tokens` and the model's context
    allow; with it, `requested` must fit both (it is never silently shortened)."""
    if not prompt:
        raise ApiError(400, "the prompt is empty (0 tokens)", param="prompt")
    if len(prompt) > config.max_prompt_tokens:
        raise ApiError(
            400,
            f"the prompt has {len(prompt)} tokens; this server accepts at most {config.max_prompt_tokens}",
            code="prompt_too_long",
            param="prompt",
        )
    room = context_length - len(prompt) if context_length else config.max_tokens
    if room < 1:
        raise ApiError(
            400,
            f"the prompt ({len(prompt)} tokens) fills the model's context of {context_length} tokens",
            code="context_length_exceeded",
            param="prompt",
        )
    if requested is None:
        return min(config.max_tokens, room)
    if requested > config.max_tokens:
        raise ApiError(
            400, f"max_tokens={requested} is above this server's limit of {config.max_tokens}", param="max_tokens"
        )
    if requested > room:
        raise ApiError(
            400,
            f"the prompt ({len(prompt)} tokens) plus max_tokens={requested} exceeds the model's "
            f"context of {context_length} tokens",
            code="context_length_exceeded",
            param="max_tokens",
        )
    return requested
