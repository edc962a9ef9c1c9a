"""`ServeConfig`: the server's name for its base model, its limits, who may do what, and how many adapters it
keeps where."""

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
        api_key: when set, every endpoint but /health and the admin API wants `Authorization: Bearer <api_key>`.
        admin_key: the admin API (loading, reloading, unloading adapters) wants `Authorization: Bearer
            <admin_key>`; without one the admin API is off (the API key never opens it).
        docs: serve /docs, /redoc and /openapi.json (behind the API key); off by default.
        adapter_dirs: folders adapters may be loaded from at run time (none: run-time loading is off).
        auto_load: a request naming an unknown adapter that is a folder in `adapter_dirs` loads it.
        max_loaded_adapters: adapters on the model (in the batched stacks) at once; the least recently used
            one moves to host memory to make room (None: no limit).
        max_cpu_adapters: adapters kept in host memory beyond those on the model; the least recently used
            one beyond it is dropped and read from its folder again on its next use (None: no limit).
        pinned: adapters that stay on the model (never moved to host memory).
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
    admin_key: str | None = None
    docs: bool = False
    adapter_dirs: tuple[Path, ...] = ()
    auto_load: bool = True
    max_loaded_adapters: int | None = None
    max_cpu_adapters: int | None = None
    pinned: tuple[str, ...] = ()
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
        if self.max_loaded_adapters is not None and self.max_loaded_adapters < 1:
            raise ValueError(f"max_loaded_adapters must be at least 1, got {self.max_loaded_adapters}")
        if self.max_cpu_adapters is not None and self.max_cpu_adapters < 0:
            raise ValueError(f"max_cpu_adapters must not be negative, got {self.max_cpu_adapters}")
        for name in ("api_key", "admin_key"):
            if getattr(self, name) == "":
                raise ValueError(f"{name} must not be empty (leave it out to go without one)")
        if self.api_key is not None and self.api_key == self.admin_key:
            raise ValueError("the admin key must differ from the API key: clients must not be able to load adapters")
        if self.max_loaded_adapters is not None and len(set(self.pinned)) >= self.max_loaded_adapters:
            raise ValueError(
                f"{len(set(self.pinned))} pinned adapters leave no room on the model for others "
                f"(max_loaded_adapters={self.max_loaded_adapters}); pin fewer or allow more"
            )
