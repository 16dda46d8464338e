"""Domain errors and the one table that maps every one of them to an HTTP error."""

from __future__ import annotations

import logging
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reranker.errors import BackendError, TooManyItemsError
from service.batching import QueueFullError

log = logging.getLogger(__name__)


class ServiceError(Exception):
    """A request the service refuses; ``field`` names the offending request field, if any."""

    def __init__(self, message: str, field: str | None = None) -> None:
        super().__init__(message)
        self.field = field


class LimitExceededError(ServiceError):
    """A request value is over a configured limit."""


class UnknownCollectionError(ServiceError):
    pass


class CollectionRequiredError(ServiceError):
    """Several collections are loaded and the request did not say which."""


class NotReadyError(ServiceError):
    """No collection is loaded, so nothing can be served."""


class RerankUnavailableError(ServiceError):
    """Reranking is required (or the endpoint needs it) and cannot be done."""


class UnauthorizedError(ServiceError):
    pass


class BodyTooLargeError(ServiceError):
    pass


@dataclass(frozen=True)
class HttpError:
    status: int
    code: str


ERROR_TABLE: dict[type[Exception], HttpError] = {
    LimitExceededError: HttpError(422, "limit_exceeded"),
    TooManyItemsError: HttpError(422, "too_many_candidates"),
    UnknownCollectionError: HttpError(404, "unknown_collection"),
    CollectionRequiredError: HttpError(422, "collection_required"),
    UnauthorizedError: HttpError(401, "unauthorized"),
    BodyTooLargeError: HttpError(413, "body_too_large"),
    QueueFullError: HttpError(429, "overloaded"),
    NotReadyError: HttpError(503, "not_ready"),
    RerankUnavailableError: HttpError(503, "reranker_unavailable"),
    BackendError: HttpError(503, "reranker_unavailable"),
}

_HTTP_CODES = {400: "bad_request", 401: "unauthorized", 404: "not_found",
               405: "method_not_allowed", 413: "body_too_large", 415: "unsupported_media_type"}

RETRY_AFTER_SECONDS = 1


def error_json(status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    return JSONResponse({"error": {"code": code, "message": message, "field": field}},
                        status_code=status, headers=headers)


def _lookup(exc: Exception) -> HttpError:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    raise LookupError(type(exc))


def error_response(exc: Exception) -> JSONResponse:
    """The JSON error for a domain exception, from the table."""
    mapping = _lookup(exc)
    headers = {"Retry-After": str(RETRY_AFTER_SECONDS)} if mapping.status in (429, 503) else None
    if mapping.status == 401:
        headers = {"WWW-Authenticate": "Bearer"}
    return error_json(mapping.status, mapping.code, str(exc), getattr(exc, "field", None), headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def _field_path(loc: tuple[Any, ...]) -> str | None:
    parts = list(loc[1:] if loc and loc[0] in ("body", "query", "path") else loc)
    path = ""
    for part in parts:
        path += f"[{part}]" if isinstance(part, int) else (f".{part}" if path else str(part))
    return path or None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    first = errors[0] if errors else {"type": "invalid", "loc": (), "msg": "invalid request"}
    if first["type"] == "json_invalid":
        ctx = first.get("ctx") or {}
        reason = ctx.get("error", "") if isinstance(ctx, dict) else ""
        return error_json(400, "invalid_json", f"request body is not valid JSON: {reason}", "body")
    field = _field_path(tuple(first["loc"])) or "body"
    message = f"{field}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_json(422, "invalid_request", message, field)


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    code = _HTTP_CODES.get(exc.status_code, "http_error")
    headers = dict(exc.headers) if exc.headers else None
    field = "body" if exc.status_code == 413 else None
    return error_json(exc.status_code, code, str(exc.detail), field, headers)


async def _unexpected(request: Request, exc: Exception) -> JSONResponse:
    # The traceback goes to the log, never to the client.
    log.exception("unhandled error on %s %s", request.method, request.url.path)
    return error_json(500, "internal_error", "internal error; the server log has the details")


def install_error_handlers(app: FastAPI) -> None:
    for exc_type in ERROR_TABLE:
        app.add_exception_handler(exc_type, _domain_error)
    app.add_exception_handler(RequestValidationError, _validation_error)
    app.add_exception_handler(StarletteHTTPException, _http_error)
    app.add_exception_handler(Exception, _unexpected)
