"""Exceptions become HTTP here and only here, with the error body of API.md; never a stack trace."""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException

from prefix_store.errors import (
    InvalidName,
    PrefixCacheFull,
    PrefixNotFound,
    PrefixValidationError,
    StoreUnavailable,
    VersionMismatch,
)
from server.engine.async_engine import EngineStopped
from server.engine.request import RequestTooLong
from server.engine.scheduler import QueueFull, RequestTooLarge

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API answers with ``status`` and ``{"error": {"type", "message"}}``."""

    def __init__(
        self, status: int, error_type: str, message: str, headers: dict[str, str] | None = None
    ) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> JSONResponse:
    return JSONResponse(
        {"error": {"type": error_type, "message": message}}, status_code=status, headers=headers
    )


_STATUS_TYPES = {  # error types of plain HTTP errors (unknown route, wrong method)
    400: "invalid_request",
    401: "authentication_error",
    403: "permission_denied",
    404: "not_found",
    405: "method_not_allowed",
    409: "conflict",
    412: "precondition_failed",
    413: "payload_too_large",
    422: "validation_error",
    429: "rate_limited",
    503: "unavailable",
}


class ErrorDetail(BaseModel):
    type: str = Field(description="the kind of error, e.g. invalid_request, not_found, rate_limited")
    message: str = Field(description="what went wrong; never a stack trace, a path or a key")


class ErrorBody(BaseModel):
    """The body of every error response."""

    error: ErrorDetail


_WHEN = {  # API.md's table: when each error status is answered
    400: "malformed input: an invalid task id, a prefix that fails validation, a bad multipart body",
    401: "missing or unknown API key",
    403: "the key is valid but its role is insufficient",
    404: "unknown task id (in the caller's tenant) or model",
    409: "the tenant's prefix count quota is reached, or an If-Match precondition failed",
    412: "the If-Match version precondition failed",
    413: "the body, the upload, the prompt or the tenant's prefix bytes are over their limit",
    422: "the body or a parameter does not match the schema, or is over a server limit",
    429: "the queue is full or the tenant is over its rate or concurrency limit",
    503: "the server is starting or stopping, or the store is unreachable for a prefix not cached",
    504: "the request did not finish within the server's time limit",
}
_HEADERS: dict[int, dict[str, Any]] = {
    401: {"WWW-Authenticate": {"description": "Bearer", "schema": {"type": "string"}}},
    429: {"Retry-After": {"description": "seconds to wait before retrying", "schema": {"type": "string"}}},
}


def error_responses(*statuses: int) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` declaring ``statuses`` with the error body (FastAPI's own 422 schema is
    replaced: every error, schema errors included, has the body of API.md)."""
    return {
        status: {
            "model": ErrorBody,
            "description": _WHEN[status],
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


def _translate(exc: Exception) -> ApiError | None:
    match exc:
        case ApiError():
            return exc
        case PrefixValidationError():
            return ApiError(
                exc.status, "invalid_prefix" if exc.status == 400 else "payload_too_large", exc.message
            )
        case InvalidName():
            return ApiError(400, "invalid_request", str(exc))
        case PrefixNotFound():
            return ApiError(404, "not_found", str(exc))
        case VersionMismatch():
            return ApiError(412, "precondition_failed", str(exc))
        case PrefixCacheFull():
            return ApiError(
                503,
                "unavailable",
                "the prefix cache is full of prefixes in use; retry shortly",
                {"Retry-After": "1"},
            )
        case StoreUnavailable():
            return ApiError(503, "store_unavailable", "the prefix store is unavailable; try again later")
        case RequestTooLong() | RequestTooLarge():
            return ApiError(413, "payload_too_large", str(exc))
        case QueueFull():
            retry_after = str(max(1, math.ceil(exc.retry_after)))
            return ApiError(429, "rate_limited", str(exc), headers={"Retry-After": retry_after})
        case EngineStopped():
            return ApiError(503, "unavailable", "the server is shutting down")
    return None


_BODY_RULE = "the body must be a JSON object (content-type: application/json)"
_JSON_KINDS = {list: "an array", str: "a string", bool: "a boolean", int: "a number", float: "a number"}


def _schema_problem(error: Any, body: Any, request: Request) -> str:
    """One of a ``RequestValidationError``'s errors, said for a client: where, and what is wrong."""
    loc = tuple(error["loc"])
    if error["type"] == "json_invalid":
        return _invalid_json(error, body)
    if loc == ("body",) and error["type"] in ("missing", "model_attributes_type", "dict_type"):
        return f"{_BODY_RULE}; {_what_came(error.get('input'), request)}"
    return f"{'.'.join(str(part) for part in loc if part != 'body') or 'body'}: {error['msg']}"


def _invalid_json(error: Any, document: Any) -> str:
    """``invalid JSON: <reason> at line L column C`` (FastAPI gives the reason and the offset only)."""
    reason = error.get("ctx", {}).get("error", "not JSON")
    offset = error["loc"][-1]
    if not isinstance(document, str) or not isinstance(offset, int):
        return f"invalid JSON: {reason}"
    line = document.count("\n", 0, offset) + 1
    column = offset - document.rfind("\n", 0, offset)  # as json.JSONDecodeError counts: from 1
    return f"invalid JSON: {reason} at line {line} column {column}"


def _what_came(body: Any, request: Request) -> str:
    if isinstance(body, bytes | bytearray):  # not parsed: the content type is not JSON
        content_type = request.headers.get("content-type")
        return f"got content-type {content_type[:100]!r}" if content_type else "got no content-type"
    if body is None:
        return "got no body"
    return f"got {_JSON_KINDS.get(type(body), 'another JSON value')}"


def install_error_handlers(app: FastAPI) -> None:
    async def known(_: Request, exc: Exception) -> JSONResponse:
        error = _translate(exc)
        assert error is not None
        return error_response(error.status, error.error_type, error.message, error.headers)

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(exc.status_code, _STATUS_TYPES.get(exc.status_code, "error"), message)

    async def schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        problems = "; ".join(_schema_problem(error, exc.body, request) for error in exc.errors())
        return error_response(422, "validation_error", problems[:2000])

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")

    for exc_type in (
        ApiError,
        PrefixValidationError,
        InvalidName,
        PrefixNotFound,
        VersionMismatch,
        StoreUnavailable,
        PrefixCacheFull,
        RequestTooLong,
        RequestTooLarge,
        QueueFull,
        EngineStopped,
    ):
        app.add_exception_handler(exc_type, known)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, schema_error)
    app.add_exception_handler(Exception, unexpected)
