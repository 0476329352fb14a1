"""Hostile uploads over real HTTP, as replacements of a task that serves and as new tasks: each gets a
4xx with docs/API.md's error body, nothing is stored (the store's tree is byte-for-byte the same), the task
still serves its previous version, no pickle is ever loaded (the canary never appears) and the
server's memory stays bounded. ``python -m hardening.hostile_uploads`` runs more examples."""

from __future__ import annotations

import subprocess
import sys
import time
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest

from hardening.hostile import canary_pickles
from hardening.hostile_uploads import NEWCOMER, HostileRun, catalogue, fuzz_uploads
from hardening.prefixes import model_geometry
from tests.hardening.conftest import Hardened

pytestmark = pytest.mark.e2e  # starts servers or other processes

EXAMPLES = 12  # per hypothesis strategy (six strategies)


@pytest.fixture
def hostile(api_server: Hardened) -> Iterator[HostileRun]:
    canary = api_server.store.parent / "canary"
    with (
        api_server.client() as client,
        HostileRun(api_server.server, client, api_server.store, canary) as run,
    ):
        yield run
    report = run.report
    assert report.problems == [], "\n".join(
        f"[{p['family']}] {p['upload']} -> {p['task']}: {p['problem']}" for p in report.problems
    )
    assert report.store_unchanged, "a refused upload changed the store's files"
    assert report.previous_version_serving, "the task no longer serves its previous version"
    assert not report.canary_created, "a pickle was loaded"
    assert report.passed, report.to_json()


def test_every_named_hostile_upload_is_refused(api_server: Hardened, hostile: HostileRun) -> None:
    env = api_server.server.env
    named = catalogue(
        model_geometry(api_server.server.model_dir),
        hostile.canary,
        max_virtual_tokens=int(env["PREFIX_SERVE_MAX_VIRTUAL_TOKENS"]),
        cap_bytes=int(env["PREFIX_SERVE_MAX_UPLOAD_BYTES"]) + 256 * 1024,
    )
    assert sum(len(uploads) for uploads in named.values()) >= 80
    for family, uploads in named.items():
        for upload in uploads:
            hostile.send(upload, family)
            hostile.send(upload, family, NEWCOMER)


def test_generated_malformed_prefixes_are_refused(api_server: Hardened, hostile: HostileRun) -> None:
    fuzz_uploads(hostile, model_geometry(api_server.server.model_dir), examples=EXAMPLES, seed=0)
    assert hostile.report.sent == 6 * EXAMPLES


def test_a_body_far_past_the_cap_is_not_buffered(api_server: Hardened) -> None:
    """64 MiB sent without a Content-Length: refused as it streams in, memory bounded, server fine."""
    chunk = b"\0" * (1 << 20)

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="p"\r\n\r\n'
        for _ in range(64):
            yield chunk

    before = api_server.server.rss_bytes()
    started = time.perf_counter()
    with api_server.client() as client:
        try:
            status = client.put(
                "/v1/admin/prefixes/huge",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            ).status_code
        except httpx.TransportError:  # past the drained part the server closes: a reset is a refusal too
            status = None
        assert status in (413, None) and time.perf_counter() - started < 30
        assert api_server.server.rss_bytes() - before < 16 * 2**20
        assert client.get("/v1/admin/prefixes/huge").status_code == 404
        assert (
            client.post("/v1/generate", json={"prompt": "still fine", "max_new_tokens": 2}).status_code == 200
        )


def test_a_body_refused_as_it_streams_leaves_the_connection_usable(api_server: Hardened) -> None:
    """The 413 of a body without Content-Length, then the next request on the same keep-alive
    connection: once the app's ClientDisconnect reached uvicorn, which dropped the connection."""

    def body() -> Iterator[bytes]:
        yield b'--b\r\nContent-Disposition: form-data; name="file"; filename="p"\r\n\r\n'
        for _ in range(32):
            yield b"\0" * 65_536

    with api_server.client() as client:
        for _ in range(3):
            assert client.get("/v1/admin/prefixes").status_code == 200
            refused = client.put(
                "/v1/admin/prefixes/streamed",
                content=body(),
                headers={"content-type": "multipart/form-data; boundary=b"},
            )
            assert refused.status_code == 413 and refused.json()["error"]["type"] == "payload_too_large"
    assert "Exception in ASGI application" not in api_server.server.log_tail(20_000)


def test_the_canary_is_live(tmp_path: Path) -> None:
    """The pickles above do create the canary when loaded (here, on purpose, in a child process), so
    its absence after the uploads means something."""
    canary = tmp_path / "canary"
    payload = canary_pickles(canary)["pickle (protocol 2)"]
    subprocess.run(
        [sys.executable, "-c", "import pickle, sys; pickle.loads(sys.stdin.buffer.read())"],
        input=payload,
        check=True,
    )
    assert canary.exists()
