"""The admin routes: list the loaded adapters with their in-use counts and places, load an adapter from an
allowed folder, reload one from its folder in place, and unload one once no request uses it. `create_app` adds
the admin key check to the router.

The load and unload handlers are plain functions, so FastAPI runs them in a worker thread: loading reads
files, and unloading waits for the requests that hold the adapter.
"""

from __future__ import annotations

from typing import Any

from fastapi import APIRouter
from pydantic import BaseModel

from .context import Context
from .errors import api_error_for
from .registry import Conflict, ModelNotFound

router = APIRouter()


class LoadAdapter(BaseModel):
    """The body of `POST /admin/adapters`: the new adapter's name and its folder inside an allowed folder."""

    name: str
    path: str


@router.get("/admin/adapters", response_model=None)
def list_adapters(context: Context) -> dict[str, Any]:
    """Semantics: every loaded adapter with the number of queued or running requests that hold it, where it is
    ("model", "host" memory or "disk" only) and whether it is pinned to the model."""
    registry = context.registry
    return {
        "adapters": [
            {"name": n, "in_use": count, "tier": registry.tier(n), "pinned": n in registry.pinned}
            for n, count in registry.in_use().items()
        ]
    }


@router.post("/admin/adapters", response_model=None)
def load_adapter(body: LoadAdapter, context: Context) -> dict[str, Any]:
    """Semantics: 200 with the model list once the adapter serves requests; 403 outside the allowed folders (or
    with run-time loading off), 404 for a missing folder, 409 for a name in use, 400 for a bad name or adapter."""
    registry = context.registry
    try:
        registry.load_allowed(body.name, body.path)
    except (ValueError, KeyError, FileNotFoundError, PermissionError, Conflict) as err:
        raise api_error_for(err) from None
    return {"loaded": body.name, "models": registry.model_names()}


@router.post("/admin/adapters/{name}/reload", response_model=None)
def reload_adapter(name: str, context: Context) -> dict[str, Any]:
    """Semantics: the adapter's folder is read again (with the same checks as a load); 200 once requests that
    come next get the new weights, while those in flight finish on the old ones; 404 for an unknown adapter,
    400 (the old weights stay) for a folder that no longer holds a valid adapter for this model."""
    try:
        context.registry.reload(name)
    except (ModelNotFound, ValueError, FileNotFoundError, PermissionError) as err:
        raise api_error_for(err) from None
    return {"reloaded": name, "models": context.registry.model_names()}


@router.delete("/admin/adapters/{name}", response_model=None)
def unload_adapter(name: str, context: Context) -> dict[str, Any]:
    """Semantics: new requests for the adapter are refused at once; the answer (200) comes once the requests
    that hold it have finished, or 409 after the server's unload timeout (the adapter then stays loaded)."""
    registry = context.registry
    try:
        registry.unload(name)
    except (ModelNotFound, Conflict) as err:
        raise api_error_for(err) from None
    return {"unloaded": name, "models": registry.model_names()}
