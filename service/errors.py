"""Domain errors and the one table that maps every error the API can answer with to its HTTP
status, its code and its description. The exception handlers, the routes' OpenAPI ``responses``
and the codes of the framework's own HTTP errors are all read from ``ERROR_TABLE``."""

from __future__ import annotations

import logging
import re
from collections.abc import Iterable
from dataclasses import dataclass
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from starlette.exceptions import HTTPException as StarletteHTTPException

from reranker.errors import (
    BackendError,
    ItemTooLongError,
    OverBudgetError,
    PromptTooLongError,
    TooManyItemsError,
)
from retriever.vocabulary import CollectionUnavailableError
from runtime.batching import QueueFullError
from service.protocol import ErrorBody

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


# The framework's own refusals, named so that they sit in the table like the others.
class InvalidJsonError(ServiceError):
    pass


class InvalidRequestError(ServiceError):
    pass


class RouteNotFoundError(ServiceError):
    pass


class MethodNotAllowedError(ServiceError):
    pass


class UnsupportedMediaTypeError(ServiceError):
    pass


class RequestTimeoutError(ServiceError):
    """The client stopped sending its request."""


@dataclass(frozen=True)
class HttpError:
    status: int
    code: str
    description: str


ERROR_TABLE: dict[type[Exception], HttpError] = {
    InvalidJsonError: HttpError(400, "invalid_json", "Malformed JSON"),
    UnauthorizedError: HttpError(401, "unauthorized", "Missing or wrong API key"),
    UnknownCollectionError: HttpError(404, "unknown_collection", "Unknown collection"),
    RouteNotFoundError: HttpError(404, "not_found", "No such route"),
    MethodNotAllowedError: HttpError(405, "method_not_allowed", "Method not allowed"),
    RequestTimeoutError: HttpError(408, "request_timeout", "The request was not sent in time"),
    BodyTooLargeError: HttpError(413, "body_too_large", "Request body too large"),
    UnsupportedMediaTypeError: HttpError(415, "unsupported_media_type", "Unsupported media type"),
    InvalidRequestError: HttpError(422, "invalid_request", "Invalid field"),
    LimitExceededError: HttpError(422, "limit_exceeded", "A value over a configured limit"),
    TooManyItemsError: HttpError(422, "too_many_items",
                                 "More candidates or options than the reranker has labels"),
    PromptTooLongError: HttpError(422, "limit_exceeded",
                                  "A prompt over the model's context or the configured limit"),
    ItemTooLongError: HttpError(422, "limit_exceeded", "An item over the per-item token limit"),
    OverBudgetError: HttpError(422, "limit_exceeded",
                               "Work that would take the reranker longer than its budget"),
    CollectionRequiredError: HttpError(422, "collection_required",
                                       "Several collections are loaded; name one"),
    QueueFullError: HttpError(429, "overloaded", "Overloaded: retry after the Retry-After header"),
    NotReadyError: HttpError(503, "not_ready", "No collection is loaded"),
    RerankUnavailableError: HttpError(503, "reranker_unavailable",
                                      "The reranker is needed and unavailable"),
    BackendError: HttpError(503, "reranker_unavailable", "The reranker is needed and unavailable"),
    CollectionUnavailableError: HttpError(503, "retrieval_unavailable",
                                          "The collection's store (a Milvus server) does not "
                                          "answer"),
}

# Errors any route can answer with, before or around its own work.
COMMON_ERRORS: tuple[type[Exception], ...] = (InvalidJsonError, UnauthorizedError,
                                              RequestTimeoutError, BodyTooLargeError,
                                              UnsupportedMediaTypeError, InvalidRequestError)
# The status of a framework HTTPException, mapped back to its entry of the table.
_BY_STATUS: dict[int, type[Exception]] = {
    entry.status: cls for cls, entry in ERROR_TABLE.items()
    if cls in (RouteNotFoundError, MethodNotAllowedError, UnsupportedMediaTypeError,
               BodyTooLargeError, UnauthorizedError, InvalidJsonError, RequestTimeoutError)
}

RETRY_AFTER_SECONDS = 1


def responses_for(*errors: type[Exception]) -> dict[int | str, dict[str, Any]]:
    """A route's OpenAPI ``responses``: one entry per status, its descriptions joined."""
    by_status: dict[int, list[str]] = {}
    for cls in (*COMMON_ERRORS, *errors):
        entry = ERROR_TABLE[cls]
        descriptions = by_status.setdefault(entry.status, [])
        if entry.description not in descriptions:
            descriptions.append(entry.description)
    return {status: {"model": ErrorBody, "description": "; ".join(descriptions)}
            for status, descriptions in sorted(by_status.items())}


_SURROGATE = re.compile("[\ud800-\udfff]")


def _printable(text: str) -> str:
    # A field path can hold a client's JSON key, lone surrogates and all; escape them.
    return _SURROGATE.sub(lambda m: f"\\u{ord(m.group()):04x}", text)


def error_json(status: int, code: str, message: str, field: str | None = None,
               headers: dict[str, str] | None = None) -> JSONResponse:
    body = {"error": {"code": code, "message": _printable(message),
                      "field": None if field is None else _printable(field)}}
    return JSONResponse(body, status_code=status, headers=headers)


def _lookup(exc: Exception) -> HttpError:
    for cls in type(exc).__mro__:
        if cls in ERROR_TABLE:
            return ERROR_TABLE[cls]
    raise LookupError(type(exc))


def error_response(exc: Exception, headers: dict[str, str] | None = None) -> JSONResponse:
    """The JSON error for an exception of the table."""
    mapping = _lookup(exc)
    if mapping.status in (429, 503):
        headers = {"Retry-After": str(RETRY_AFTER_SECONDS), **(headers or {})}
    if mapping.status == 401:
        headers = {"WWW-Authenticate": "Bearer", **(headers or {})}
    return error_json(mapping.status, mapping.code, str(exc), getattr(exc, "field", None), headers)


async def _domain_error(request: Request, exc: Exception) -> JSONResponse:
    return error_response(exc)


def _field_path(loc: Iterable[Any]) -> str | None:
    parts = list(loc)
    if parts and parts[0] in ("body", "query", "path"):
        parts = parts[1:]
    path = ""
    for part in parts:
        if isinstance(part, int):
            path += f"[{part}]"
        elif part in ("str", "TextDocument", "function-after[_valid_unicode(), str]"):
            continue  # the union member pydantic tried, not a field of the request
        else:
            path += f".{part}" if path else str(part)
    return path or None


async def _validation_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, RequestValidationError)
    errors = exc.errors()
    # The deepest error is the most specific one: of a union (a document is a string or an
    # object with a text), the member that came closest.
    first = (max(errors, key=lambda e: len(e["loc"])) if errors
             else {"type": "invalid", "loc": (), "msg": "invalid request"})
    if first["type"] == "json_invalid":
        ctx = first.get("ctx") or {}
        reason = ctx.get("error", "") if isinstance(ctx, dict) else ""
        return error_response(InvalidJsonError(f"request body is not valid JSON: {reason}",
                                               "body"))
    field = _field_path(first["loc"]) or "body"
    message = f"{field}: {first['msg']}"
    if len(errors) > 1:
        message += f" (and {len(errors) - 1} more)"
    return error_response(InvalidRequestError(message, field))


async def _http_error(request: Request, exc: Exception) -> JSONResponse:
    assert isinstance(exc, StarletteHTTPException)
    headers = dict(exc.headers) if exc.headers else None
    cls = _BY_STATUS.get(exc.status_code)
    if cls is None:
        return error_json(exc.status_code, "http_error", str(exc.detail), None, headers)
    field = "body" if cls in (BodyTooLargeError, InvalidJsonError, RequestTimeoutError) else None
    return error_response(cls(str(exc.detail), field), headers)


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


