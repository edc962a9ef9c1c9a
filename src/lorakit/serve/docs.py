"""The API's own documentation (`/openapi.json`, `/docs`, `/redoc`), served only with `--docs` and then behind
the API key like every other route: FastAPI's built-in documentation routes would be open to everyone, so
`create_app` turns them off and adds these to a router that carries the key check."""

from __future__ import annotations

from fastapi import APIRouter, FastAPI
from fastapi.openapi.docs import get_redoc_html, get_swagger_ui_html
from fastapi.responses import HTMLResponse, JSONResponse


def docs_router(app: FastAPI) -> APIRouter:
    """The three documentation routes of `app` (its OpenAPI schema, Swagger UI and ReDoc pages)."""
    router = APIRouter(include_in_schema=False)

    @router.get("/openapi.json")
    async def openapi() -> JSONResponse:
        return JSONResponse(app.openapi())

    @router.get("/docs")
    async def swagger() -> HTMLResponse:
        return get_swagger_ui_html(openapi_url="/openapi.json", title=f"{app.title} - Swagger UI")

    @router.get("/redoc")
    async def redoc() -> HTMLResponse:
        return get_redoc_html(openapi_url="/openapi.json", title=f"{app.title} - ReDoc")

    return router
