"""Streamed answers: a generation's text pieces as OpenAI-style server-sent events (`stream: true`).

Semantics: every event is a `data: <json chunk>` line pair. Chat streams open with one chunk per choice that
carries only the assistant role; then each non-empty text piece is a chunk of its choice; a choice ends with a
chunk carrying its `finish_reason` (no text). With `stream_options.include_usage`, a last chunk has no choices
and the token counts. A failed generation sends an error body as its event. The stream always ends with
`data: [DONE]`.
"""

from __future__ import annotations

import json
from collections.abc import AsyncIterator
from typing import Any

from fastapi.responses import StreamingResponse

from . import protocol
from .generation import Generation, GenerationFailed


def _event(data: dict[str, Any]) -> str:
    return f"data: {json.dumps(data)}\n\n"


async def completion_events(
    body: protocol.RequestBase, generation: Generation, chat: bool, request_id: str
) -> AsyncIterator[str]:
    """The server-sent events of one request's generation, as described in the module docstring."""

    def chunk(choices: list[dict[str, Any]], use: dict[str, int] | None = None) -> str:
        return _event(protocol.completion_body(request_id, body.model, choices, use, chat, True))

    try:
        if chat:  # the role comes first, as OpenAI sends it
            yield chunk([protocol.choice(i, "", None, chat, True, first=True) for i in range(len(generation.requests))])
        async for index, piece, finish in generation.pieces():
            if piece:
                yield chunk([protocol.choice(index, piece, None, chat, True)])
            if finish is not None:
                yield chunk([protocol.choice(index, None if chat else "", finish, chat, True)])
        if body.stream_options and body.stream_options.include_usage:
            yield chunk([], protocol.usage(generation.prompt_tokens, generation.completion_tokens))
    except GenerationFailed as err:
        yield _event(protocol.error_body(str(err), "server_error"))
    yield "data: [DONE]\n\n"


def stream_response(
    body: protocol.RequestBase, generation: Generation, chat: bool, request_id: str
) -> StreamingResponse:
    """The HTTP response that sends `completion_events` as they come."""
    events = completion_events(body, generation, chat, request_id)
    return StreamingResponse(events, media_type="text/event-stream", headers={"Cache-Control": "no-cache"})
