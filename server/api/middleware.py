"""ASGI middleware: URL paths without control characters, a cap on request bodies (checked while they
stream in) and JSON access logs."""

from __future__ import annotations

import json
import logging
import re
import time
import uuid
from collections.abc import Callable

from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store.errors import InvalidName
from prefix_store.storage.names import validate_task_id
from server.api.errors import error_response

access_log = logging.getLogger("prefix_serve.access")

_CONTROL = re.compile(r"[\x00-\x1f\x7f]")
# an X-Request-Id taken as it is: 1-128 printable ASCII characters, no space (anything else, control
# characters and bytes over 0x7E included, is replaced, never echoed into a header or the log)
_REQUEST_ID = re.compile(rb"[\x21-\x7e]{1,128}")
_PREFIX_ROUTE = "/v1/admin/prefixes/"


class PathCheckMiddleware:
    """Refuses (400) a URL path holding a control character, before any route sees it: the router's
    patterns end in ``$``, which also matches before a final newline, so ``/v1/admin/prefixes/%0A`` would
    otherwise reach the list route. Under ``/v1/admin/prefixes/`` the answer is the task-name rule."""

    def __init__(self, app: ASGIApp) -> None:
        self.app = app

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        path = scope.get("path", "") if scope["type"] == "http" else ""
        if not _CONTROL.search(path):
            await self.app(scope, receive, send)
            return
        message = "the URL path must not contain control characters"
        if path.startswith(_PREFIX_ROUTE):
            try:
                validate_task_id(path[len(_PREFIX_ROUTE) :])
            except InvalidName as exc:
                message = str(exc)
        await error_response(400, "invalid_request", message)(scope, receive, send)


class BodyLimitMiddleware:
    """Refuse bodies over a cap with 413, counting bytes as they arrive (a missing or false
    Content-Length does not help a sender), so nothing past the cap is buffered or parsed."""

    def __init__(self, app: ASGIApp, limit_for: Callable[[Scope], int]) -> None:
        self.app, self.limit_for = app, limit_for

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        limit = self.limit_for(scope)
        declared = dict(scope["headers"]).get(b"content-length")
        if declared is not None and declared.isdigit() and int(declared) > limit:
            await _too_large(limit)(scope, receive, send)
            return
        received = 0
        refused = False  # we answered 413; the app sees a disconnect and its own answer is dropped

        async def counting_receive() -> Message:
            nonlocal received, refused
            if refused:
                return {"type": "http.disconnect"}
            message = await receive()
            if message["type"] == "http.request":
                received += len(message.get("body", b""))
                if received > limit:
                    if not started:
                        await _too_large(limit)(scope, receive, send)
                    refused = True
                    return {"type": "http.disconnect"}
            return message

        started = False

        async def guarded_send(message: Message) -> None:
            nonlocal started
            if refused:
                return
            started = started or message["type"] == "http.response.start"
            await send(message)

        try:
            await self.app(scope, counting_receive, guarded_send)
        except Exception:
            if not refused:
                raise
            # Answered 413 already. What the app raised at the disconnect it was handed (ClientDisconnect)
            # must not reach the server: it would log an error and drop the connection, and a client
            # reusing it would get a reset instead of its next answer.


def _too_large(limit: int):
    return error_response(413, "payload_too_large", f"the request body is over the limit of {limit} bytes")


class AccessLogMiddleware:
    """One JSON line per request: id, tenant, task, route, status, latency and tokens. The id is the
    request's ``X-Request-Id`` when that is a plain token (``_request_id``), else a new one. Responses carry
    ``X-Request-Id`` and ``X-Served-By`` (this replica's name, so a load balancer's task affinity can be
    observed)."""

    def __init__(self, app: ASGIApp, replica_name: str) -> None:
        self.app = app
        self.served_by = replica_name.encode("latin-1", "replace")

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        request_id = _request_id(dict(scope["headers"]).get(b"x-request-id"))
        scope.setdefault("state", {})["request_id"] = request_id
        started = time.perf_counter()
        status = 500

        async def send_with_id(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
                message.setdefault("headers", []).extend(
                    [(b"x-request-id", request_id.encode("ascii")), (b"x-served-by", self.served_by)]
                )
            await send(message)

        try:
            await self.app(scope, receive, send_with_id)
        finally:
            state = scope.get("state", {})
            route = scope.get("route")
            access_log.info(
                json.dumps(
                    {
                        "request_id": request_id,
                        "method": scope["method"],
                        "route": getattr(route, "path", scope["path"]),
                        "status": status,
                        "latency_ms": round((time.perf_counter() - started) * 1000, 1),
                        "tenant": state.get("tenant"),
                        "task_id": state.get("task_id"),
                        "completion_tokens": state.get("completion_tokens"),
                    }
                )
            )


def _request_id(sent: bytes | None) -> str:
    """The request's id: its ``X-Request-Id`` if that is 1-128 printable ASCII characters without spaces,
    else a new one (32 hex digits), as when it has none."""
    if sent is not None and _REQUEST_ID.fullmatch(sent):
        return sent.decode("ascii")
    return uuid.uuid4().hex
