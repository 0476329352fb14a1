"""``X-Request-Id``: a request's own id is kept only when it is 1-128 printable ASCII characters without
spaces (0x21-0x7E); anything else is replaced by a new 32-hex-digit id, as when there is none. The response
header and the access log carry the same id.

Over real HTTP first. uvicorn's HTTP parser refuses control characters in a header before any route runs,
so the middleware is also driven directly as an ASGI app, as a server or proxy that lets them through
would drive it."""

from __future__ import annotations

import asyncio
import json
import logging
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from starlette.types import Receive, Scope, Send

from server.api.middleware import AccessLogMiddleware
from testing.server_process import ServerProcess

GENERATED = re.compile(r"[0-9a-f]{32}")
# name -> (the X-Request-Id sent, None for no header; whether the server keeps it)
OVER_HTTP: dict[str, tuple[bytes | None, bool]] = {
    "plain": (b"abc-123", True),
    "every-printable": (bytes(range(0x21, 0x7F)), True),
    "128-characters": (b"r" * 128, True),
    "129-characters": (b"r" * 129, False),
    "none": (None, False),
    "empty": (b"", False),
    "space": (b"two words", False),
    "tab": (b"two\twords", False),
    "latin-1": (b"caf\xe9", False),
    "utf-8": ("café".encode(), False),
}
CONTROL = [b"a\x00b", b"a\x1bb", b"a\r\nX-Injected: 1", b"\x7f", b"a\x85b"]


@pytest.fixture(scope="module")
def exchanges(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> dict[str, tuple[str, str]]:
    """For each case of ``OVER_HTTP``: the ``X-Request-Id`` of the response and the ``request_id`` of its
    access log line (read once the server has stopped, so every request's line is written)."""
    folder = tmp_path_factory.mktemp("request-ids")
    log_path = folder / "server.log"
    answered: dict[str, str] = {}
    with (
        ServerProcess(demo_model_dir, (folder / "store").as_uri(), log_path=log_path) as server,
        httpx.Client(base_url=server.url, timeout=60) as client,
    ):
        for name, (sent, _) in OVER_HTTP.items():
            headers = {} if sent is None else {"X-Request-Id": sent}
            response = client.get(f"/v1/probe/{name}", headers=headers)
            assert response.status_code == 404 and response.json()["error"]["type"] == "not_found"
            answered[name] = response.headers["x-request-id"]
        healthy = client.get("/healthz", headers={"X-Request-Id": "healthy-1"})
        assert healthy.status_code == 200 and healthy.headers["x-request-id"] == "healthy-1"
    logged = {entry["route"]: entry["request_id"] for entry in _access_log(log_path.read_text())}
    assert logged["/healthz"] == "healthy-1"
    return {name: (answered[name], logged[f"/v1/probe/{name}"]) for name in OVER_HTTP}


def _access_log(text: str) -> Iterator[dict[str, object]]:
    marker = "prefix_serve.access: "
    for line in text.splitlines():
        if marker in line:
            yield json.loads(line.split(marker, 1)[1])


@pytest.mark.e2e  # starts a server process
@pytest.mark.parametrize("name", OVER_HTTP)
def test_a_request_id_is_kept_only_when_it_is_printable_ascii(
    exchanges: dict[str, tuple[str, str]], name: str
) -> None:
    sent, kept = OVER_HTTP[name]
    answered, logged = exchanges[name]
    assert answered == logged
    if kept:
        assert sent is not None and answered == sent.decode("ascii")
    else:
        assert GENERATED.fullmatch(answered), answered
    assert len({ids[0] for ids in exchanges.values()}) == len(exchanges)  # every generated id is new


async def _no_content(scope: Scope, receive: Receive, send: Send) -> None:
    await send({"type": "http.response.start", "status": 204, "headers": []})
    await send({"type": "http.response.body", "body": b""})


async def _get_through_the_middleware(request_id: bytes) -> httpx.Response:
    """GET through ``AccessLogMiddleware`` as an ASGI app (the transport runs it to its end, access log
    line included, before it answers)."""
    app = AccessLogMiddleware(_no_content, replica_name="replica-1")
    async with httpx.AsyncClient(transport=httpx.ASGITransport(app), base_url="http://test") as client:
        return await client.get("/x", headers={"X-Request-Id": request_id})


@pytest.mark.parametrize("sent", CONTROL, ids=["nul", "escape", "crlf", "del", "c1"])
def test_control_characters_are_never_echoed(sent: bytes, caplog: pytest.LogCaptureFixture) -> None:
    caplog.set_level(logging.INFO, logger="prefix_serve.access")
    response = asyncio.run(_get_through_the_middleware(sent))
    answered = response.headers["x-request-id"]
    assert GENERATED.fullmatch(answered) and "x-injected" not in response.headers
    logged = [
        json.loads(record.getMessage()) for record in caplog.records if record.name == "prefix_serve.access"
    ]
    assert [entry["request_id"] for entry in logged] == [answered]
