"""An httpx transport that records what the SDK sends, for tests that look at the wire."""

from __future__ import annotations

import time
from itertools import pairwise

import httpx


class Recorder:
    """What the SDK put on the wire: an httpx transport that records each request and passes it on to
    the real network transport (the server still answers everything)."""

    def __init__(self) -> None:
        self.requests: list[httpx.Request] = []
        self.sent_at: list[float] = []  # time.monotonic() as each request went out
        self.statuses: list[int] = []  # of the answers, as they arrive

    def sync(self) -> httpx.Client:
        recorder, inner = self, httpx.HTTPTransport()

        class Transport(httpx.BaseTransport):
            def handle_request(self, request: httpx.Request) -> httpx.Response:
                recorder.requests.append(request)
                recorder.sent_at.append(time.monotonic())
                response = inner.handle_request(request)
                recorder.statuses.append(response.status_code)
                return response

            def close(self) -> None:
                inner.close()

        return httpx.Client(transport=Transport())

    def async_(self) -> httpx.AsyncClient:
        recorder, inner = self, httpx.AsyncHTTPTransport()

        class Transport(httpx.AsyncBaseTransport):
            async def handle_async_request(self, request: httpx.Request) -> httpx.Response:
                recorder.requests.append(request)
                recorder.sent_at.append(time.monotonic())
                response = await inner.handle_async_request(request)
                recorder.statuses.append(response.status_code)
                return response

            async def aclose(self) -> None:
                await inner.aclose()

        return httpx.AsyncClient(transport=Transport())

    def paths(self) -> list[str]:
        return [f"{r.method} {r.url.path}" for r in self.requests]

    def gaps(self) -> list[float]:
        """Seconds between one request going out and the next."""
        return [later - earlier for earlier, later in pairwise(self.sent_at)]
