"""`lorakit serve`: one base model, many LoRA adapters, an OpenAI-compatible HTTP API.

Requests name an adapter in their `model` field (the base model's own name selects none). Requests for different
adapters run in one batch: the base model's matrix products once for the whole batch, each adapter's low-rank
part on its own rows (`lorakit.adapter_rows`). Modules:

- app.py: assembles the server (`create_app`);   - context.py: the objects that requests share;
- completions.py: the OpenAI routes;             - streaming.py: answers as server-sent events;
- monitoring.py: /health and /metrics;           - admin.py: loading, reloading, unloading adapters at run time;
- docs.py: the API documentation (--docs);       - limits.py: API and admin keys, body size, token budget;
- errors.py: error answers and their statuses;   - config.py: `ServeConfig`, the limits;
- protocol.py: OpenAI request and response shapes; - registry.py: adapters by name, their holders, auto-loading;
- residency.py: adapters on the model, in host memory or on disk; - allowed_files.py: reading client-named folders;
- scheduler.py: queue and continuous batching;   - engine.py: prefill / decode steps and sampling;
- kvcache.py: the KV cache, one row per sequence; - generation.py: a request's sequences on the event loop;
- text.py: tokens to streamed text, stop strings; - metrics.py: Prometheus text.
"""

from .app import create_app
from .config import ServeConfig

__all__ = ["ServeConfig", "create_app"]
