"""Error answers: `ApiError` (an HTTP status with an OpenAI-style error body), the status each library error of a
request maps to, and the exception handlers that turn both, and pydantic's validation errors, into responses.

Every error answer is counted in the metrics as a request refused before queueing, by status.
"""

from __future__ import annotations

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse

from . import protocol
from .allowed_files import Forbidden
from .context import context_of
from .registry import Conflict, ModelNotFound
from .scheduler import QueueFull


class ApiError(Exception):
    """A request the server refuses: `status` with the body `{"error": {message, type (kind), param, code}}`."""

    def __init__(
        self,
        status: int,
        message: str,
        kind: str = "invalid_request_error",
        code: str | None = None,
        param: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.message, self.kind, self.code, self.param = status, message, kind, code, param


def api_error_for(err: Exception) -> ApiError:
    """The HTTP answer to a library error raised by a request's own input."""
    message = err.args[0] if isinstance(err, KeyError) and err.args else str(err)
    if isinstance(err, ModelNotFound):
        return ApiError(404, message, code="model_not_found", param="model")
    if isinstance(err, Forbidden):
        return ApiError(403, message, "permission_error")
    if isinstance(err, Conflict):
        return ApiError(409, message, code="conflict")
    if isinstance(err, FileNotFoundError):
        return ApiError(404, message, code="not_found")
    if isinstance(err, QueueFull):
        return ApiError(429, message, "rate_limit_error", code="queue_full")
    return ApiError(400, message)


def error_response(request: Request, err: ApiError) -> JSONResponse:
    """The response for `err`, counted as a rejected request."""
    context_of(request).metrics.rejected(err.status)
    return JSONResponse(protocol.error_body(err.message, err.kind, err.code, err.param), status_code=err.status)


async def _on_api_error(request: Request, err: ApiError) -> JSONResponse:
    return error_response(request, err)


async def _on_invalid(request: Request, err: RequestValidationError) -> JSONResponse:
    # One line naming each bad field by its path inside the body (loc[0] is "body" itself).
    problems = "; ".join(f"{'.'.join(str(p) for p in e['loc'][1:]) or 'body'}: {e['msg']}" for e in err.errors())
    return error_response(request, ApiError(400, f"invalid request: {problems}"))


def install_error_handlers(app: FastAPI) -> None:
    """Answer `ApiError` and request validation errors with OpenAI-style error bodies."""
    # the decorator form: Starlette's add_exception_handler is typed for handlers of any Exception
    app.exception_handler(ApiError)(_on_api_error)
    app.exception_handler(RequestValidationError)(_on_invalid)
