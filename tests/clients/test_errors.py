"""Each error class from a real server answering that status, and the retries of 429, 503 and
connection errors: Retry-After honoured, backoff taken, limits kept, unsafe writes not repeated."""

from __future__ import annotations

import asyncio
import socket
import subprocess
import threading
from collections.abc import Callable
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import pytest
from prefix_client import (
    APIConnectionError,
    APIResponseValidationError,
    APIStatusError,
    APITimeoutError,
    AsyncClient,
    AuthenticationError,
    Client,
    ConflictError,
    NotFoundError,
    PayloadTooLargeError,
    PermissionDeniedError,
    PrefixServeError,
    RateLimitError,
    RetryPolicy,
    ServerError,
    ServiceUnavailableError,
    ValidationError,
)

from testing.waiting import PATIENCE_S, wait_until
from tests.clients.conftest import MAX_REQUEST_BYTES, Keys
from tests.clients.recorder import Recorder
from tests.server.api.live_server import free_port

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time"
FAST_BACKOFF = RetryPolicy(max_retries=2, initial_backoff=0.05, max_backoff=0.2)


def _raises(
    call: Callable[[], object], cls: type[APIStatusError], status: int, error_type: str
) -> APIStatusError:
    with pytest.raises(cls) as caught:
        call()
    error = caught.value
    assert isinstance(error, APIStatusError) and isinstance(error, PrefixServeError)
    assert (error.status_code, error.type) == (status, error_type), str(error)
    assert error.message and str(error).startswith(f"{status} {error_type}: ")
    assert error.request_id and error.response.status_code == status
    return error


def test_status_errors_sync(server: str, keys: Keys, native_prefix: Path, oversize_prefix: Path) -> None:
    with Client(server, None, max_retries=0) as anonymous:
        error = _raises(lambda: anonymous.list_prefixes(), AuthenticationError, 401, "authentication_error")
        assert error.response.headers["www-authenticate"] == "Bearer"
    with Client(server, "ps-not-a-key", max_retries=0) as stranger:
        _raises(lambda: stranger.generate(PROMPT), AuthenticationError, 401, "authentication_error")
    with Client(server, keys.user, max_retries=0) as user:
        _raises(lambda: user.list_prefixes(), PermissionDeniedError, 403, "permission_denied")
        _raises(
            lambda: user.upload_prefix("t", native_prefix), PermissionDeniedError, 403, "permission_denied"
        )
        _raises(lambda: user.generate(PROMPT, task_id="missing"), NotFoundError, 404, "not_found")
        _raises(lambda: user.stream(PROMPT, task_id="missing"), NotFoundError, 404, "not_found")
        _raises(lambda: user.generate(PROMPT, temperature=-1.0), ValidationError, 422, "validation_error")
        _raises(lambda: user.generate(""), ValidationError, 422, "validation_error")
        too_long = "word " * MAX_REQUEST_BYTES
        _raises(lambda: user.generate(too_long), PayloadTooLargeError, 413, "payload_too_large")
    with Client(server, keys.admin, max_retries=0) as admin:
        _raises(lambda: admin.get_prefix("missing"), NotFoundError, 404, "not_found")
        _raises(lambda: admin.delete_prefix("missing"), NotFoundError, 404, "not_found")
        _raises(lambda: admin.download_prefix("missing", "x"), NotFoundError, 404, "not_found")
        _raises(
            lambda: admin.upload_prefix("big", oversize_prefix),
            PayloadTooLargeError,
            413,
            "payload_too_large",
        )
        uploaded = admin.upload_prefix("guarded", native_prefix)
        stale = "0-000000000000"
        _raises(
            lambda: admin.upload_prefix("guarded", native_prefix, if_match=stale),
            ConflictError,
            412,
            "precondition_failed",
        )
        _raises(
            lambda: admin.delete_prefix("guarded", if_match=stale), ConflictError, 412, "precondition_failed"
        )
        assert admin.get_prefix("guarded").version == uploaded.version  # nothing changed
        admin.delete_prefix("guarded")


def test_a_server_side_400_is_a_validation_error(server: str, keys: Keys, tmp_path: Path) -> None:
    """A file that is well-formed safetensors (so the SDK sends it) but not a prefix for this model."""
    import torch
    from safetensors.torch import save

    wrong = tmp_path / "wrong.safetensors"
    tensors = {"keys": torch.zeros(1, 1, 2, 3), "values": torch.zeros(1, 1, 2, 3)}
    wrong.write_bytes(
        save(tensors, metadata={"format": "prefix-serve/1", "num_virtual_tokens": "2", "base_model": "x"})
    )
    with Client(server, keys.admin, max_retries=0) as admin:
        error = _raises(lambda: admin.upload_prefix("wrong", wrong), ValidationError, 400, "invalid_prefix")
        assert "base model" in error.message


def test_status_errors_async(server: str, keys: Keys, native_prefix: Path, oversize_prefix: Path) -> None:
    async def scenario() -> None:
        async with AsyncClient(server, keys.admin, max_retries=0) as admin:
            with pytest.raises(PayloadTooLargeError):
                await admin.upload_prefix("big", oversize_prefix)
            with pytest.raises(ConflictError):
                await admin.upload_prefix("guarded-async", native_prefix, if_match="0-000000000000")
        async with AsyncClient(server, keys.user, max_retries=0) as user:
            with pytest.raises(PermissionDeniedError):
                await user.get_prefix("x")
            with pytest.raises(NotFoundError):
                await user.stream(PROMPT, task_id="missing")
            with pytest.raises(ValidationError):
                await user.generate(PROMPT, top_p=0.0)
        async with AsyncClient(server, "ps-wrong", max_retries=0) as stranger:
            with pytest.raises(AuthenticationError):
                await stranger.generate(PROMPT)
        async with AsyncClient(server, keys.limited, max_retries=0) as limited:
            with pytest.raises(RateLimitError) as caught:
                for _ in range(3):  # 2 requests per minute
                    await limited.generate(PROMPT, max_new_tokens=1)
            assert caught.value.retry_after is not None and caught.value.retry_after >= 1

    asyncio.run(scenario())


def test_a_retry_after_over_the_cap_is_raised_not_waited_for(server: str, keys: Keys) -> None:
    recorder = Recorder()
    policy = RetryPolicy(max_retries=3, max_retry_after=5.0)
    with Client(server, keys.limited, max_retries=policy, http_client=recorder.sync()) as client:
        with pytest.raises(RateLimitError) as caught:
            for _ in range(3):  # the tenant's bucket (2 per minute) runs dry; it refills in ~30 s
                client.generate(PROMPT, max_new_tokens=1)
        assert caught.value.retry_after is not None and caught.value.retry_after > 5
    # the client waits only to repeat a call: the refusal was the last request, and was not repeated
    assert recorder.statuses[-1] == 429 and recorder.statuses.count(429) == 1
    assert len(recorder.requests) <= 3


class _SlotHolder:
    """Holds the ``serial`` tenant's single slot with a running stream until ``release``."""

    def __init__(self, server: str, key: str) -> None:
        self._opened, self._release = threading.Event(), threading.Event()
        self._thread = threading.Thread(target=self._hold, args=(server, key))
        self._thread.start()
        assert self._opened.wait(PATIENCE_S), "the holding stream did not start"

    def _hold(self, server: str, key: str) -> None:
        with (
            Client(server, key, max_retries=0) as client,
            client.stream(PROMPT, max_new_tokens=1000) as tokens,
        ):
            next(tokens)
            self._opened.set()
            self._release.wait(PATIENCE_S)

    def release(self) -> None:
        """Close the stream (the server aborts it and gives the slot back) and wait for the thread."""
        self._release.set()
        self._thread.join()


def test_429_is_retried_after_retry_after_then_succeeds(server: str, keys: Keys) -> None:
    holder = _SlotHolder(server, keys.serial)
    recorder = Recorder()

    def release_once_refused() -> None:  # the slot comes back during the client's wait to retry
        try:
            wait_until(lambda: 429 in recorder.statuses, "the client is refused")
        finally:
            holder.release()

    releaser = threading.Thread(target=release_once_refused)
    releaser.start()
    try:
        with Client(server, keys.serial, max_retries=5, http_client=recorder.sync()) as client:
            generation = client.generate(PROMPT, max_new_tokens=2)
    finally:
        releaser.join()
    assert generation.usage.completion_tokens == 2
    refusals = recorder.statuses.count(429)  # one, unless the slot came back later than Retry-After
    assert refusals >= 1 and recorder.statuses == [429] * refusals + [200]
    assert all(gap >= 1.0 for gap in recorder.gaps())  # the server's Retry-After of 1 s, never cut short


def test_429_retries_give_up_after_max_retries(server: str, keys: Keys) -> None:
    holder = _SlotHolder(server, keys.serial)  # held until the client has given up
    recorder = Recorder()
    try:
        with (
            Client(server, keys.serial, max_retries=1, http_client=recorder.sync()) as client,
            pytest.raises(RateLimitError) as caught,
        ):
            client.generate(PROMPT, max_new_tokens=2)
    finally:
        holder.release()
    assert caught.value.retry_after == 1.0
    assert recorder.statuses == [429, 429]  # a retry, then raised
    assert recorder.gaps()[0] >= 1.0  # the retry came after the server's Retry-After of 1 s


def test_503_when_the_store_is_unreachable(store_down_server: str) -> None:
    recorder = Recorder()
    with Client(store_down_server, max_retries=FAST_BACKOFF, http_client=recorder.sync()) as client:
        health = client.health()  # an answer, not an error
        assert not health.ready and health.status == "store unavailable"
        recorder.requests.clear()
        error = _raises(client.list_prefixes, ServiceUnavailableError, 503, "store_unavailable")
        assert isinstance(error, ServerError)
        assert len(recorder.requests) == 3  # retried twice, then raised
        _raises(
            lambda: client.generate(PROMPT, task_id="cold"), ServiceUnavailableError, 503, "store_unavailable"
        )
        assert client.generate(PROMPT, max_new_tokens=2).usage.completion_tokens == 2  # no prefix: served

    async def async_503() -> None:
        async with AsyncClient(store_down_server, max_retries=0) as client:
            with pytest.raises(ServiceUnavailableError):
                await client.get_prefix("cold")

    asyncio.run(async_503())


def test_503_is_retried_until_the_store_is_back(
    store_down_server: str, redis_port: int, tmp_path: Path
) -> None:
    """The store comes back (a real redis-server on its port) while the SDK backs off: the call succeeds."""
    recorder = Recorder()
    # retries for far longer than Redis takes to start, even on a loaded machine; the call ends as soon
    # as the store answers
    policy = RetryPolicy(max_retries=40, initial_backoff=0.2, max_backoff=1.0)
    redis: subprocess.Popen[bytes] | None = None

    def start_redis_after_a_refusal() -> None:
        nonlocal redis
        wait_until(lambda: 503 in recorder.statuses, "the SDK has been refused once")
        redis = subprocess.Popen(
            [
                "redis-server",
                "--port",
                str(redis_port),
                "--bind",
                "127.0.0.1",
                "--save",
                "",
                "--appendonly",
                "no",
            ],
            cwd=tmp_path,
            stdout=subprocess.DEVNULL,
        )

    starter = threading.Thread(target=start_redis_after_a_refusal)
    starter.start()
    try:
        with Client(store_down_server, max_retries=policy, http_client=recorder.sync()) as client:
            assert client.list_prefixes() == []
        assert recorder.statuses[0] == 503 and recorder.statuses[-1] == 200
    finally:
        starter.join()
        if redis is not None:
            redis.terminate()
            redis.wait(10)


def test_connection_errors_are_retried_with_backoff_then_raised() -> None:
    closed = f"http://127.0.0.1:{free_port()}"
    recorder = Recorder()
    with Client(closed, max_retries=FAST_BACKOFF, http_client=recorder.sync()) as client:
        with pytest.raises(APIConnectionError) as caught:
            client.list_prefixes()
        assert not isinstance(caught.value, APIStatusError) and "could not connect" in str(caught.value)
        assert len(recorder.requests) == 3
        recorder.requests.clear()
        with pytest.raises(APIConnectionError):  # nothing was sent: even a plain upload may be repeated
            client.delete_prefix("t")
        assert len(recorder.requests) == 3


def test_an_upload_is_not_repeated_after_the_server_may_have_acted(native_prefix: Path) -> None:
    """A server that takes the request and drops the connection without answering: the upload may
    have been applied, so it is not repeated, unless If-Match makes a repeat harmless."""
    with socket.socket() as listener:
        listener.bind(("127.0.0.1", 0))
        listener.listen(16)
        stop = threading.Event()

        def accept_and_hang_up() -> None:
            listener.settimeout(0.1)
            while not stop.is_set():
                try:
                    conn, _ = listener.accept()
                except TimeoutError:
                    continue
                conn.recv(65536)
                conn.close()

        thread = threading.Thread(target=accept_and_hang_up)
        thread.start()
        try:
            url = f"http://127.0.0.1:{listener.getsockname()[1]}"
            recorder = Recorder()
            with Client(url, max_retries=FAST_BACKOFF, http_client=recorder.sync()) as client:
                with pytest.raises(APIConnectionError):
                    client.upload_prefix("t", native_prefix)
                assert len(recorder.requests) == 1
                recorder.requests.clear()
                with pytest.raises(APIConnectionError):
                    client.upload_prefix("t", native_prefix, if_match="1-abc")
                assert len(recorder.requests) == 3
                recorder.requests.clear()
                with pytest.raises(APIConnectionError):
                    client.list_prefixes()  # a read is always safe to repeat
                assert len(recorder.requests) == 3
        finally:
            stop.set()
            thread.join()


def test_timeouts_raise_api_timeout_error(server: str, keys: Keys) -> None:
    with Client(server, keys.user, timeout=0.05, max_retries=0) as client:
        with pytest.raises(APITimeoutError) as caught:
            client.generate(PROMPT, max_new_tokens=1000)
        assert isinstance(caught.value, APIConnectionError)

    async def async_timeout() -> None:
        async with AsyncClient(server, keys.user, timeout=0.05, max_retries=0) as client:
            with pytest.raises(APITimeoutError):
                await client.generate(PROMPT, max_new_tokens=1000)

    asyncio.run(async_timeout())


class _NotPrefixServe(BaseHTTPRequestHandler):
    """What a misconfigured proxy might answer: 200 with a page, or an event stream of garbage."""

    def do_GET(self) -> None:
        self._answer("text/html", b"<html>Welcome to nginx!</html>")

    def do_POST(self) -> None:
        self.rfile.read(int(self.headers["content-length"]))
        self._answer("text/event-stream", b"data: {not json\n\n")

    def _answer(self, content_type: str, body: bytes) -> None:
        self.send_response(200)
        self.send_header("content-type", content_type)
        self.send_header("content-length", str(len(body)))
        self.end_headers()
        self.wfile.write(body)

    def log_message(self, *args: object) -> None:
        pass


def test_an_answer_that_is_not_the_api_is_a_clear_error() -> None:
    httpd = ThreadingHTTPServer(("127.0.0.1", 0), _NotPrefixServe)
    thread = threading.Thread(target=httpd.serve_forever)
    thread.start()
    try:
        with Client(f"http://127.0.0.1:{httpd.server_port}", max_retries=0) as client:
            with pytest.raises(
                APIResponseValidationError, match="unexpected answer to GET /v1/admin/prefixes"
            ):
                client.list_prefixes()
            with (
                client.stream("hi") as tokens,
                pytest.raises(APIResponseValidationError, match="malformed event"),
            ):
                next(tokens)
    finally:
        httpd.shutdown()
        thread.join()
