"""The monitoring routes: `GET /health` (open to everyone, for load balancers and orchestrators) and
`GET /metrics` (Prometheus text; behind the API key like the API routes, so `create_app` adds the key check
to `router` and not to `health_router`).
"""

from __future__ import annotations

from fastapi import APIRouter
from fastapi.responses import JSONResponse, PlainTextResponse

from .context import Context

health_router = APIRouter()
router = APIRouter()


@health_router.get("/health")
async def health(context: Context) -> JSONResponse:
    """Semantics: 200 `{"status": "ok", "queued": n, "running": n}` (sequences) while the batching worker runs,
    503 with status "stopped" once it has ended."""
    scheduler = context.scheduler
    queued, running = scheduler.counts()
    status = "ok" if scheduler.alive else "stopped"
    return JSONResponse(
        {"status": status, "queued": sum(queued.values()), "running": sum(running.values())},
        status_code=200 if scheduler.alive else 503,
    )


@router.get("/metrics")
async def prometheus(context: Context) -> PlainTextResponse:
    """The metrics in the Prometheus text format, with the queue and batch per model at the time of the scrape."""
    queued, running = context.scheduler.counts()
    text = context.metrics.render(queued, running, context.registry.model_names(), context.registry.residency.tiers())
    return PlainTextResponse(text, media_type="text/plain; version=0.0.4")
