"""The OpenAI-compatible request and response shapes of `/v1/completions` and `/v1/chat/completions`.

Requests are validated by pydantic (types and ranges); options the server does not implement are refused by
`unsupported` with a message naming them, rather than silently ignored. Unknown extra fields (clients send
vendor options) are accepted and ignored.
"""

from __future__ import annotations

import time
import uuid
from typing import Any, Literal

from pydantic import BaseModel, ConfigDict, Field


class StreamOptions(BaseModel):
    include_usage: bool = False


class RequestBase(BaseModel):
    """What completion and chat requests share: the model, sampling, stop strings, streaming."""

    model_config = ConfigDict(extra="allow")

    model: str
    temperature: float = Field(1.0, ge=0.0, le=2.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    seed: int | None = Field(None, ge=0, lt=2**63)
    stream: bool = False
    stream_options: StreamOptions | None = None
    stop: str | list[str] | None = None
    n: int = 1
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0
    logit_bias: dict[str, float] | None = None
    user: str | None = None
    ignore_eos: bool = False  # an extension (as in vLLM): generate max_tokens tokens, EOS or not (benchmarks)

    def stop_strings(self) -> list[str]:
        return [self.stop] if isinstance(self.stop, str) else list(self.stop or [])

    def unsupported(self) -> str | None:
        """A message naming the first option this server does not implement, or None."""
        extra = self.model_extra or {}
        if len(self.stop_strings()) > 4:
            return f"'stop' takes up to 4 strings, got {len(self.stop_strings())}"
        checks = [
            ("n", self.n != 1),
            ("presence_penalty", self.presence_penalty != 0),
            ("frequency_penalty", self.frequency_penalty != 0),
            ("logit_bias", bool(self.logit_bias)),
            ("best_of", extra.get("best_of") not in (None, 1)),
            ("response_format", extra.get("response_format") not in (None, {"type": "text"})),
            *(
                (name, bool(extra.get(name)))
                for name in ("suffix", "tools", "functions", "tool_choice", "top_logprobs")
            ),
        ]
        for name, refused in checks:
            if refused:
                return (
                    f"option {name!r} is not supported by this server (it implements model, prompt / messages, "
                    "max_tokens, temperature, top_p, seed, stop, stream and stream_options)"
                )
        return None


class CompletionRequest(RequestBase):
    prompt: str | list[str] = Field(..., description="the complete model input (no template is applied)")
    max_tokens: int | None = Field(16, ge=1)
    echo: bool = False
    logprobs: int | None = None

    def unsupported(self) -> str | None:
        if self.echo or self.logprobs is not None:
            return f"option {'echo' if self.echo else 'logprobs'!r} is not supported by this server"
        return super().unsupported()


class TextPart(BaseModel):
    type: Literal["text"]
    text: str


class Message(BaseModel):
    model_config = ConfigDict(extra="allow")

    role: Literal["system", "developer", "user", "assistant"]
    content: str | list[TextPart] | None = None

    def text(self) -> str:
        if isinstance(self.content, list):
            return "".join(part.text for part in self.content)
        return self.content or ""


class ChatRequest(RequestBase):
    messages: list[Message] = Field(..., min_length=1)
    max_tokens: int | None = Field(None, ge=1)
    max_completion_tokens: int | None = Field(None, ge=1)
    logprobs: bool = False

    def unsupported(self) -> str | None:
        if self.logprobs:
            return "option 'logprobs' is not supported by this server"
        return super().unsupported()

    def token_limit(self) -> int | None:
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens


def new_id(prefix: str) -> str:
    return f"{prefix}-{uuid.uuid4().hex[:24]}"


def usage(prompt_tokens: int, completion_tokens: int) -> dict[str, int]:
    return {
        "prompt_tokens": prompt_tokens,
        "completion_tokens": completion_tokens,
        "total_tokens": prompt_tokens + completion_tokens,
    }


def completion_body(
    request_id: str, model: str, choices: list[dict[str, Any]], use: dict | None, chat: bool, chunk: bool = False
) -> dict[str, Any]:
    kind = ("chat.completion.chunk" if chunk else "chat.completion") if chat else "text_completion"
    body = {"id": request_id, "object": kind, "created": int(time.time()), "model": model, "choices": choices}
    if use is not None or not chunk:
        body["usage"] = use
    return body


def choice(
    index: int, text: str | None, finish_reason: str | None, chat: bool, chunk: bool = False, first: bool = False
) -> dict[str, Any]:
    """One entry of `choices`: a whole answer, or (chunk) a streamed piece of it."""
    if not chat:
        return {"index": index, "text": text or "", "finish_reason": finish_reason, "logprobs": None}
    if not chunk:
        return {
            "index": index,
            "message": {"role": "assistant", "content": text},
            "finish_reason": finish_reason,
            "logprobs": None,
        }
    delta: dict[str, str] = {"role": "assistant"} if first else {}
    if text is not None:
        delta["content"] = text
    return {"index": index, "delta": delta, "finish_reason": finish_reason, "logprobs": None}


def error_body(message: str, kind: str, code: str | None = None, param: str | None = None) -> dict[str, Any]:
    return {"error": {"message": message, "type": kind, "param": param, "code": code}}
