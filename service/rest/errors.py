"""Every REST error response, in one place: ``{"error": "..."}`` with the status of
``service.errors.CODES``.

503 carries ``Retry-After``; 401 carries ``WWW-Authenticate``. Anything unexpected is logged
with its traceback and answered 500 "internal error", never shown to the client.
"""

from __future__ import annotations

import logging

import orjson
from fastapi import FastAPI, Request, Response
from fastapi.exceptions import RequestValidationError
from starlette.exceptions import HTTPException as StarletteHTTPException

from service.errors import InvalidInput, ServiceError, Unauthorized, Unavailable, codes

logger = logging.getLogger(__name__)


def error_response(status: int, message: str, headers: dict[str, str] | None = None) -> Response:
    return Response(
        orjson.dumps({"error": message}),
        status_code=status,
        media_type="application/json",
        headers=headers,
    )


async def _service_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, (ServiceError, InvalidInput))
    headers = None
    if isinstance(exc, Unavailable):
        headers = {"Retry-After": str(exc.retry_after_s)}
    elif isinstance(exc, Unauthorized):
        headers = {"WWW-Authenticate": 'Bearer realm="gated-admin"'}
    return error_response(codes(exc)[0], exc.message, headers)


async def _http_error(request: Request, exc: Exception) -> Response:
    # Starlette's own 404 (no such route) and 405 (wrong method) keep their status.
    assert isinstance(exc, StarletteHTTPException)
    return error_response(exc.status_code, str(exc.detail), dict(exc.headers or {}) or None)


async def _validation_error(request: Request, exc: Exception) -> Response:
    assert isinstance(exc, RequestValidationError)
    first = exc.errors()[0] if exc.errors() else {}
    where = ".".join(str(p) for p in first.get("loc", ())) or "request"
    return error_response(400, f"{where}: {first.get('msg', 'invalid request')}")


async def _unexpected(request: Request, exc: Exception) -> Response:
    logger.error("unhandled error on %s %s", request.method, request.url.path, exc_info=exc)
    return error_response(500, "internal error")


def register_exception_handlers(app: FastAPI) -> None:
    """Map every error to ``{"error": "..."}`` with its status (see ``service.errors.CODES``)."""
    app.add_exception_handler(ServiceError, _service_error)
    app.add_exception_handler(InvalidInput, _service_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(Exception, _unexpected)
