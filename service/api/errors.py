"""One error shape for every failure: {"error": {"message", "type", "code", "param"}}."""

from __future__ import annotations

import logging
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import GatekeeperError
from service.schemas import ErrorBody, ErrorResponse

logger = logging.getLogger(__name__)

# a 400 from the framework is a body it could not parse (invalid UTF-8, nesting deeper than
# the JSON parser allows, an integer too long to convert)
_HTTP_CODES = {
    400: "invalid_body",
    404: "not_found",
    405: "method_not_allowed",
    413: "payload_too_large",
}


def error_response(
    status: int, message: str, error_type: str, code: str, param: str | None = None
) -> JSONResponse:
    body = ErrorResponse(error=ErrorBody(message=message, type=error_type, code=code, param=param))
    return JSONResponse(status_code=status, content=body.model_dump())


def _count(request: Request, status: int, code: str) -> None:
    metrics = getattr(request.app.state, "metrics", None)
    if metrics is not None:
        metrics.http_errors.labels(str(status), code).inc()


def _loc(error: dict[str, Any]) -> str | None:
    # union members appear in the location as their class names; the client knows fields only
    loc = [str(p) for p in error.get("loc", ()) if p != "body" and not str(p)[:1].isupper()]
    return ".".join(loc) or None


def install_error_handlers(app: FastAPI) -> None:
    @app.exception_handler(GatekeeperError)
    async def _domain(request: Request, exc: GatekeeperError) -> JSONResponse:
        _count(request, exc.status_code, exc.code)
        if exc.status_code >= 500:
            logger.error("%s: %s", exc.code, exc.message)
        response = error_response(exc.status_code, exc.message, exc.error_type, exc.code, exc.param)
        response.headers.update(exc.headers())
        return response

    @app.exception_handler(RequestValidationError)
    async def _validation(request: Request, exc: RequestValidationError) -> JSONResponse:
        errors = exc.errors()
        first = errors[0] if errors else {}
        message = (
            "; ".join(f"{_loc(e) or 'body'}: {e.get('msg', 'invalid')}" for e in errors[:5])
            or "invalid request"
        )
        _count(request, 422, "validation_error")
        return error_response(
            422, message, "invalid_request_error", "validation_error", _loc(first)
        )

    @app.exception_handler(StarletteHTTPException)
    async def _http(request: Request, exc: StarletteHTTPException) -> JSONResponse:
        code = _HTTP_CODES.get(exc.status_code, "http_error")
        _count(request, exc.status_code, code)
        return error_response(exc.status_code, str(exc.detail), "invalid_request_error", code)

    @app.exception_handler(Exception)
    async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
        # Our own bug: logged with its traceback, never blamed on the client.
        logger.exception("unhandled error on %s", request.url.path)
        _count(request, 500, "internal_error")
        return error_response(500, "internal error", "internal_error", "internal_error")
