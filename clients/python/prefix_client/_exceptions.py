"""The SDK's one error tree. Every error the SDK raises is a ``PrefixServeError``:

PrefixServeError
├── APIStatusError              the server answered with an error status (``status_code``, ``type``)
│   ├── ValidationError         400, 422
│   ├── AuthenticationError     401
│   ├── PermissionDeniedError   403
│   ├── NotFoundError           404
│   ├── ConflictError           409, 412 (an ``If-Match`` or create-only precondition failed)
│   ├── PayloadTooLargeError    413
│   ├── RateLimitError          429 (``retry_after``)
│   └── ServerError             5xx
│       └── ServiceUnavailableError  503
├── APIConnectionError          no answer: connection refused, reset, a stream cut short
│   └── APITimeoutError
└── InvalidInputError           refused locally, before anything was sent (also a ``ValueError``)
"""

from __future__ import annotations

import email.utils
import time

import httpx

__all__ = [
    "APIConnectionError",
    "APIResponseValidationError",
    "APIStatusError",
    "APITimeoutError",
    "AuthenticationError",
    "ConflictError",
    "InvalidInputError",
    "NotFoundError",
    "PayloadTooLargeError",
    "PermissionDeniedError",
    "PrefixServeError",
    "RateLimitError",
    "ServerError",
    "ServiceUnavailableError",
    "ValidationError",
]


class PrefixServeError(Exception):
    """The root of every error the SDK raises."""


class InvalidInputError(PrefixServeError, ValueError):
    """An argument the SDK refused before sending anything (a bad task id, a pickle checkpoint, …)."""


class APIConnectionError(PrefixServeError):
    """The server could not be reached, or the connection broke before a complete answer."""

    def __init__(self, message: str = "could not reach the server", *, request: httpx.Request | None = None):
        super().__init__(message)
        self.message = message
        self.request = request


class APITimeoutError(APIConnectionError):
    """The request timed out (connecting, sending or waiting for the answer)."""

    def __init__(self, message: str = "the request timed out", *, request: httpx.Request | None = None):
        super().__init__(message, request=request)


class APIResponseValidationError(PrefixServeError):
    """A success answer whose body is not what docs/API.md says (e.g. from a proxy in between)."""


class APIStatusError(PrefixServeError):
    """The server answered with an error status and the ``{"error": {"type", "message"}}`` body.

    ``type`` is the server's machine-readable error type (e.g. ``"not_found"``, ``"rate_limited"``);
    ``retry_after`` is the ``Retry-After`` header in seconds where the server sent one;
    ``request_id`` is the ``X-Request-Id`` the server logged the request under.
    """

    def __init__(
        self,
        message: str,
        *,
        status_code: int,
        type: str,
        response: httpx.Response,
    ) -> None:
        self.message = message
        self.status_code = status_code
        self.type = type
        self.response = response
        self.request_id: str | None = response.headers.get("x-request-id")
        self.retry_after: float | None = parse_retry_after(response.headers.get("retry-after"))
        super().__init__(f"{status_code} {type}: {message}")


class ValidationError(APIStatusError):
    """400 or 422: the request was malformed or a value was out of range."""


class AuthenticationError(APIStatusError):
    """401: no API key, or one the server does not know."""


class PermissionDeniedError(APIStatusError):
    """403: the key is valid but its role may not do this (admin routes need an admin key)."""


class NotFoundError(APIStatusError):
    """404: no such task id in the caller's tenant (or no such route)."""


class ConflictError(APIStatusError):
    """409 (a quota), or 412: the ``If-Match`` version is not the prefix's current version, or a
    ``create_only`` upload found the task already there."""


class PayloadTooLargeError(APIStatusError):
    """413: the upload or the prompt is over the server's limit."""


class RateLimitError(APIStatusError):
    """429: the tenant's rate limit or the server's queue is full; ``retry_after`` says when to retry."""


class ServerError(APIStatusError):
    """5xx: the server failed or could not serve the request now."""


class ServiceUnavailableError(ServerError):
    """503: the server is not ready, or its prefix store is unreachable for a prefix it has not cached."""


_STATUS_CLASSES: dict[int, type[APIStatusError]] = {
    400: ValidationError,
    401: AuthenticationError,
    403: PermissionDeniedError,
    404: NotFoundError,
    409: ConflictError,
    412: ConflictError,
    413: PayloadTooLargeError,
    422: ValidationError,
    429: RateLimitError,
    503: ServiceUnavailableError,
}


def make_status_error(response: httpx.Response) -> APIStatusError:
    """The error for an error ``response`` (its body already read): the one place status → class."""
    status = response.status_code
    error_type, message = _error_body(response)
    cls = _STATUS_CLASSES.get(status) or (ServerError if status >= 500 else APIStatusError)
    return cls(message, status_code=status, type=error_type, response=response)


def _error_body(response: httpx.Response) -> tuple[str, str]:
    """``(type, message)`` from docs/API.md's error body; something sensible for any other body (a proxy's)."""
    try:
        error = response.json()["error"]
        return str(error["type"]), str(error["message"])
    except (ValueError, KeyError, TypeError):
        text = response.text.strip().replace("\n", " ")[:200]
        return "http_error", text or response.reason_phrase or "request failed"


def parse_retry_after(value: str | None) -> float | None:
    """Seconds to wait from a ``Retry-After`` header (delta-seconds or an HTTP date), or None."""
    if value is None:
        return None
    value = value.strip()
    try:
        seconds = float(value)
    except ValueError:
        try:
            when = email.utils.parsedate_to_datetime(value)
        except (TypeError, ValueError):
            return None
        seconds = when.timestamp() - time.time()
    return max(0.0, seconds) if seconds == seconds else None  # NaN is no answer


def connection_error(exc: httpx.TransportError) -> APIConnectionError:
    """The SDK error for an httpx transport error (the one place they are translated)."""
    request = _request_of(exc)
    where = f" ({request.method} {request.url})" if request is not None else ""
    if isinstance(exc, httpx.TimeoutException):
        return APITimeoutError(f"the request timed out{where}: {type(exc).__name__}", request=request)
    if isinstance(exc, httpx.ConnectError):
        return APIConnectionError(f"could not connect to the server{where}: {exc}", request=request)
    return APIConnectionError(f"the connection to the server failed{where}: {exc}", request=request)


def _request_of(exc: httpx.TransportError) -> httpx.Request | None:
    try:
        return exc.request
    except RuntimeError:  # httpx raises this when the exception was made without a request
        return None
