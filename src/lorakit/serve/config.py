"""`ServeConfig`: the server's name for its base model, its limits, and who may do what."""

from __future__ import annotations

from dataclasses import dataclass
from pathlib import Path


@dataclass(frozen=True)
class ServeConfig:
    """Limits and settings of `lorakit serve`, validated on construction.

    Args:
        model_name: the base model's id in the API (`model` field, `/v1/models`).
        max_batch_size: sequences generated together (rows of the running batch).
        max_queue: requests waiting for a row; more are refused with 429.
        max_tokens: the largest `max_tokens` a request may ask for (also the default of chat requests).
        max_prompt_tokens: the longest prompt accepted, in tokens.
        batch_wait_ms: with nothing running, how long the first request waits for others to share its prefill.
        api_key: when set, every endpoint but /health wants `Authorization: Bearer <api_key>`.
        adapter_dirs: folders the admin API may load adapters from (none: run-time loading is off).
        unload_timeout_s: how long unloading an adapter waits for the requests that use it.
        max_body_bytes: the largest request body accepted.
    """

    model_name: str
    max_batch_size: int = 32
    max_queue: int = 256
    max_tokens: int = 512
    max_prompt_tokens: int = 2048
    batch_wait_ms: float = 10.0
    api_key: str | None = None
    adapter_dirs: tuple[Path, ...] = ()
    unload_timeout_s: float = 600.0
    max_body_bytes: int = 1 << 20

    def __post_init__(self) -> None:
        if not self.model_name:
            raise ValueError("the served model name must not be empty")
        for name in ("max_batch_size", "max_queue", "max_tokens", "max_prompt_tokens", "max_body_bytes"):
            if getattr(self, name) < 1:
                raise ValueError(f"{name} must be at least 1, got {getattr(self, name)}")
        for name in ("batch_wait_ms", "unload_timeout_s"):
            if getattr(self, name) < 0:
                raise ValueError(f"{name} must not be negative, got {getattr(self, name)}")
        if self.api_key is not None and not self.api_key.strip():
            raise ValueError("the API key must not be empty")
