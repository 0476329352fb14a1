"""Exceptions become HTTP here and only here, with the error body of docs/API.md; never a stack trace.

Two route families, two shapes: the native routes answer ``{"error": {"type", "message"}}``; the
OpenAI-compatible routes (``OPENAI_PATHS``) answer OpenAI's ``{"error": {"message", "type", "param",
"code"}}``, with 400 where the native routes say 413 or 422. An :class:`ApiError` carries what both need;
:class:`ErrorResponse` picks the shape from the path it is sent on, so the middleware's answers (sent before
any route runs) take the right one too.
"""

from __future__ import annotations

import logging
import math
from typing import Any

from fastapi import FastAPI, Request
from fastapi.exceptions import RequestValidationError
from fastapi.responses import JSONResponse
from pydantic import BaseModel, Field
from starlette.exceptions import HTTPException as StarletteHTTPException
from starlette.types import Receive, Scope, Send

from prefix_store.errors import (
    InvalidName,
    PrefixCacheFull,
    PrefixNotFound,
    PrefixValidationError,
    QuotaExceeded,
    StoreUnavailable,
    VersionMismatch,
)
from prefix_store.storage.excerpt import excerpt, excerpt_int
from server.api.refusals import ContextLengthExceeded, NewTokensOverLimit, PromptTooLong
from server.api.schema_errors import describe_schema_errors
from server.engine.async_engine import EngineStopped
from server.engine.lifecycle import FinishReason
from server.engine.request import RequestNotFinished, RequestTooLong
from server.engine.scheduler import QueueFull, RequestTooLarge

log = logging.getLogger(__name__)


class ApiError(Exception):
    """An error the API answers with ``status`` and ``{"error": {"type", "message"}}`` on the native routes;
    on the OpenAI routes, in OpenAI's shape with ``param`` (the request field at fault) and ``code`` (OpenAI's
    code for the case, e.g. ``context_length_exceeded``; unset: the status's, else ``error_type``)."""

    def __init__(
        self,
        status: int,
        error_type: str,
        message: str,
        headers: dict[str, str] | None = None,
        *,
        param: str | None = None,
        code: str | None = None,
    ) -> None:
        super().__init__(message)
        self.status, self.error_type, self.message, self.headers = status, error_type, message, headers
        self.param, self.code = param, code


# the paths of the OpenAI-compatible routes (``server.api.openai.router``; a test holds the two together)
OPENAI_PATHS = ("/v1/models", "/v1/completions", "/v1/chat/completions")
_OPENAI_STATUS = {413: 400, 422: 400}  # OpenAI answers every invalid request 400
_OPENAI_TYPES = {403: "permission_error", 429: "rate_limit_error"}  # else invalid_request_/server_error
_OPENAI_CODES = {401: "invalid_api_key", 429: "rate_limit_exceeded"}


def is_openai_path(path: str) -> bool:
    """Whether ``path`` belongs to the OpenAI-compatible routes (whose errors take OpenAI's shape)."""
    return any(path == route or path.startswith(f"{route}/") for route in OPENAI_PATHS)


def openai_error(error: ApiError) -> tuple[int, dict[str, Any]]:
    """The status and body OpenAI's clients expect for ``error`` (what vLLM's ``ErrorResponse`` carries,
    with OpenAI's types and codes)."""
    status = _OPENAI_STATUS.get(error.status, error.status)
    default_type = "server_error" if status >= 500 else "invalid_request_error"
    detail = {
        "message": error.message,
        "type": _OPENAI_TYPES.get(status, default_type),
        "param": error.param,
        "code": error.code or _OPENAI_CODES.get(status, error.error_type),
    }
    return status, {"error": detail}


class ErrorResponse(JSONResponse):
    """``error`` as a response, in the shape of the route family of the path it is sent on."""

    def __init__(self, error: ApiError) -> None:
        self.error = error
        body = {"error": {"type": error.error_type, "message": error.message}}
        super().__init__(body, status_code=error.status, headers=error.headers)

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if not is_openai_path(scope.get("path", "")):
            await super().__call__(scope, receive, send)
            return
        status, body = openai_error(self.error)
        await JSONResponse(body, status_code=status, headers=self.error.headers)(scope, receive, send)


def error_response(
    status: int, error_type: str, message: str, headers: dict[str, str] | None = None
) -> ErrorResponse:
    return ErrorResponse(ApiError(status, error_type, message, headers))


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
    """The body of every error response of the native routes."""

    error: ErrorDetail


class OpenAIErrorDetail(BaseModel):
    message: str = Field(description="what went wrong; never a stack trace, a path or a key")
    type: str = Field(description="invalid_request_error, permission_error, rate_limit_error or server_error")
    param: str | None = Field(description="the request field at fault, e.g. max_tokens or messages.0.content")
    code: str | None = Field(
        description="e.g. context_length_exceeded, model_not_found, unsupported_parameter, invalid_api_key"
    )


class OpenAIErrorBody(BaseModel):
    """The body of every error response of the OpenAI-compatible routes, as OpenAI sends it."""

    error: OpenAIErrorDetail


_WHEN = {  # docs/API.md's table: when each error status is answered
    400: "malformed input: an invalid task id, a prefix that fails validation, a bad multipart body",
    401: "missing or unknown API key",
    403: "the key is valid but its role is insufficient",
    404: "unknown task id (in the caller's tenant) or model",
    409: "the tenant's prefix count quota is reached",
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


_OPENAI_WHEN = {
    400: "an invalid request: a field out of range, unknown or not supported, a body that does not match the "
    "schema (param names the field), prompt + max_tokens over the model's context (context_length_exceeded)",
}


def error_responses(*statuses: int, openai: bool = False) -> dict[int | str, dict[str, Any]]:
    """OpenAPI ``responses=`` declaring ``statuses`` with the error body: docs/API.md's, or with ``openai``
    OpenAI's (FastAPI's own 422 schema is replaced: every error, schema errors included, has the body of
    its route family)."""
    return {
        status: {
            "model": OpenAIErrorBody if openai else ErrorBody,
            "description": (_OPENAI_WHEN if openai else {}).get(status, _WHEN[status]),
            **({"headers": _HEADERS[status]} if status in _HEADERS else {}),
        }
        for status in statuses
    }


# how a request that ended without finishing is answered; a stream that has started cannot change its
# status and reports the same type and message in its last event
_UNFINISHED: dict[FinishReason, ApiError] = {
    FinishReason.ABORTED: ApiError(
        503, "unavailable", "the request was aborted (the server is shutting down)"
    ),
    FinishReason.DEADLINE: ApiError(
        504, "deadline_exceeded", "the request did not finish within its time limit"
    ),
    FinishReason.ERROR: ApiError(
        500, "internal_error", "the engine failed while generating; see the server log"
    ),
    FinishReason.GRAMMAR: ApiError(
        400,
        "invalid_request",
        "the response_format's schema could not be followed to the end: its grammar went over a limit while "
        "generating; simplify the schema",
        param="response_format",
        code="invalid_value",
    ),
}


def unfinished_error(reason: FinishReason) -> ApiError:
    """The answer to a request that ended without finishing (its last stream event, where it streams)."""
    return _UNFINISHED[reason]


def translate(exc: Exception, *, openai: bool = False) -> ApiError | None:
    """The answer to ``exc`` on a native route, or with ``openai`` on an OpenAI-compatible one (where a name
    that is not a task is an unknown ``model``, and a request over the context is OpenAI's 400 in the words
    its clients look for); None for an exception the API does not answer on purpose."""
    match exc:
        case ApiError():
            return exc
        case PrefixValidationError():
            return ApiError(
                exc.status, "invalid_prefix" if exc.status == 400 else "payload_too_large", exc.message
            )
        case InvalidName() | PrefixNotFound() if openai:
            return _unknown_model(exc)
        case InvalidName():
            return ApiError(400, "invalid_request", str(exc))
        case PrefixNotFound():
            return ApiError(404, "not_found", str(exc))
        case VersionMismatch():
            return ApiError(412, "precondition_failed", str(exc))
        case QuotaExceeded():
            return ApiError(409 if exc.what == "prefixes" else 413, "quota_exceeded", str(exc))
        case PrefixCacheFull():
            return ApiError(
                503,
                "unavailable",
                "the prefix cache is full of prefixes in use; retry shortly",
                {"Retry-After": "1"},
            )
        case StoreUnavailable():
            return ApiError(503, "store_unavailable", "the prefix store is unavailable; try again later")
        case PromptTooLong() if openai:
            return _openai_prompt_too_long(exc)
        case PromptTooLong():
            return ApiError(413, "payload_too_large", str(exc))
        case NewTokensOverLimit():
            return ApiError(
                422, "validation_error", str(exc), param=exc.field, code="integer_above_max_value"
            )
        case ContextLengthExceeded() if openai:
            return _openai_context_length(exc)
        case ContextLengthExceeded() | RequestTooLong() if not openai:
            return ApiError(413, "payload_too_large", str(exc), code="context_length_exceeded")
        case RequestTooLong():  # the task was replaced by a longer prefix after the request was planned
            message = f"This model's maximum context length is {exc.context} tokens. However, {exc}."
            return ApiError(400, "invalid_request", message, code="context_length_exceeded")
        case RequestTooLarge():
            return ApiError(413, "payload_too_large", str(exc))
        case QueueFull():
            retry_after = str(max(1, math.ceil(exc.retry_after)))
            return ApiError(429, "rate_limited", str(exc), headers={"Retry-After": retry_after})
        case EngineStopped():
            return ApiError(503, "unavailable", "the server is shutting down")
        case RequestNotFinished():
            return unfinished_error(exc.reason)
    return None


def _unknown_model(exc: InvalidName | PrefixNotFound) -> ApiError:
    """OpenAI's 404 for a ``model`` that names neither the base model nor a task of the caller's tenant."""
    named = f" {excerpt(exc.name)}" if exc.name is not None else ""
    return ApiError(
        404,
        "not_found",
        f"the model{named} does not exist (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def _openai_prompt_too_long(exc: PromptTooLong) -> ApiError:
    """The 400 for a prompt over the server's ``max_prompt_tokens``, in words LiteLLM also recognises."""
    where = exc.prompt_field
    message = [
        f"This model's maximum context length is {exc.context} tokens." if exc.context else "",
        f"This server's maximum input length is {exc.limit} tokens.",
        f"However, your {where} resulted in {exc.tokens} tokens. Please reduce the length of the {where}.",
    ]
    return ApiError(
        400, "invalid_request", " ".join(filter(None, message)), param=where, code="context_length_exceeded"
    )


def _openai_context_length(exc: ContextLengthExceeded) -> ApiError:
    """OpenAI's 400 for a request over the model's context, in OpenAI's words: "This model's maximum context
    length is" is what LiteLLM (its ``ContextWindowExceededError``) and others look for. ``param`` is the
    prompt's field if the prompt alone is too long or the new tokens were unset, else their field."""
    where, taken = exc.prompt_field, exc.context - exc.room
    parts = f"{exc.prompt} in the {where}" + (f", {exc.prefix} in the task's prefix" if exc.prefix else "")
    if exc.encoder_decoder:
        requested = str(exc)
    elif exc.asked is None:
        requested = f"your {where} resulted in {taken} tokens" + (f" ({parts})" if exc.prefix else "")
    else:
        requested = (
            f"you requested {excerpt_int(taken + exc.asked)} tokens ({parts}, {excerpt_int(exc.asked)} in the "
            "completion)"
        )
    prompt_alone = exc.asked is None or exc.room < 1
    return ApiError(
        400,
        "invalid_request",
        f"This model's maximum context length is {exc.context} tokens. However, {requested}. Please "
        f"reduce the length of the {where}{'' if prompt_alone else ' or completion'}.",
        param=where if prompt_alone else exc.field,
        code="context_length_exceeded",
    )


def install_error_handlers(app: FastAPI) -> None:
    async def known(request: Request, exc: Exception) -> JSONResponse:
        error = translate(exc, openai=is_openai_path(request.url.path))
        assert error is not None
        return ErrorResponse(error)

    async def http_error(_: Request, exc: StarletteHTTPException) -> JSONResponse:
        message = exc.detail if isinstance(exc.detail, str) else "request failed"
        return error_response(
            exc.status_code, _STATUS_TYPES.get(exc.status_code, "error"), message, exc.headers
        )  # e.g. a 405's Allow

    async def schema_error(request: Request, exc: RequestValidationError) -> JSONResponse:
        message, param, code = describe_schema_errors(exc.errors(), exc.body, request)
        return ErrorResponse(ApiError(422, "validation_error", message, param=param, code=code))

    async def unexpected(_: Request, exc: Exception) -> JSONResponse:
        log.exception("unhandled error")
        return error_response(500, "internal_error", "internal server error")

    for exc_type in (
        ApiError,
        PrefixValidationError,
        InvalidName,
        PrefixNotFound,
        VersionMismatch,
        QuotaExceeded,
        StoreUnavailable,
        PrefixCacheFull,
        PromptTooLong,
        NewTokensOverLimit,
        ContextLengthExceeded,
        RequestTooLong,
        RequestTooLarge,
        QueueFull,
        EngineStopped,
        RequestNotFinished,
    ):
        app.add_exception_handler(exc_type, known)
    app.add_exception_handler(StarletteHTTPException, http_error)
    app.add_exception_handler(RequestValidationError, schema_error)
    app.add_exception_handler(Exception, unexpected)
