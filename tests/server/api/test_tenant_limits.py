"""Per-tenant rate and concurrency limits over real HTTP.

As the serve options set them: off by default with auth off (one local tenant), set by
``--tenant-requests-per-minute`` / ``--tenant-max-concurrent`` (or their ``PREFIX_SERVE_*`` variables), and
the defaults of tenants without an entry in the keys file.

Under load: 16 clients at once get exactly the requests a tenant's ``requests_per_minute`` or
``max_concurrent`` allows, the rest 429 with ``Retry-After``; under ``max_concurrent`` 1 the tenant's slot
comes back after every way a request can end or be refused after the limits judged it (a normal end,
JSON or streamed; 404, 413, 400, 422; the engine's full queue; a full prefix cache's 503; a client that
disconnects, streamed or not), shown by the next request being admitted; and a full prefix cache answers
503 with ``Retry-After`` until its prefix is unpinned.
"""

from __future__ import annotations

import json
import socket
import threading
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from prefix_store.storage.store import Quota
from server.api.auth import (
    AUTH_ON_MAX_CONCURRENT,
    AUTH_ON_REQUESTS_PER_MINUTE,
    Role,
    TenantLimits,
    create_key,
    load_auth_config,
)
from server.engine.base_model import BaseModel
from testing.server_process import ServerProcess
from testing.waiting import PATIENCE_S, wait_until
from tests.server.api.live_server import HeldStreams, aborted_count, gauge, wait_idle, write_keys_file
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time"
ONE_TOKEN = {"prompt": PROMPT, "max_new_tokens": 1}
# 1500 decode steps: seconds even on a fast machine, so nothing but a hang-up ends such a request while a
# test holds it (greedy from PROMPT, the demo model writes no end-of-sequence token in 1900)
LONG = 1500
CLIENTS = 16
# the crowded server's tenants: key -> (tenant, role), and their limits
CROWDED_KEYS = {
    "burst-user": ("burst", "user"),
    "crowd-user": ("crowd", "user"),
    "serial-user": ("serial", "user"),
    "serial-admin": ("serial", "admin"),
    "holder-user": ("holder", "user"),
    "holder-admin": ("holder", "admin"),
}
UNLIMITED_RATE = 100_000
CROWDED_TENANTS = {
    "burst": {"requests_per_minute": 5},
    "crowd": {"requests_per_minute": UNLIMITED_RATE, "max_concurrent": 3},
    "serial": {"requests_per_minute": UNLIMITED_RATE, "max_concurrent": 1},
    "holder": {"requests_per_minute": UNLIMITED_RATE},
}
# the crowded server's engine: 2 rows run, 6 wait (room for a burst of 5 arriving at once), more are refused
BATCH, QUEUE = 2, 6
PREFIX_TOKENS = 4  # the demo model's prefix is 1 KiB per virtual token in float32
CROWDED_ENV = {
    "PREFIX_SERVE_MAX_BATCH_SIZE": str(BATCH),
    "PREFIX_SERVE_MAX_QUEUE": str(QUEUE),
    "PREFIX_SERVE_PREFIX_CACHE_BYTES": str(PREFIX_TOKENS * 1024),  # room for one prefix
    "PREFIX_SERVE_MAX_PROMPT_TOKENS": "32",
}


@dataclass(frozen=True)
class Servers:
    open_default: ServerProcess  # auth off, no limit options
    open_limited: ServerProcess  # auth off, 5 requests/minute and 1 in flight
    keyed: ServerProcess  # auth on, 3 requests/minute for tenants without their own
    crowded: ServerProcess  # auth on, CROWDED_KEYS and CROWDED_TENANTS, a small engine and prefix cache
    keys: dict[str, str]  # tenant -> user key (of `keyed`)


@pytest.fixture(scope="module")
def servers(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    crowded_keys = write_keys_file(
        tmp_path_factory.mktemp("crowded-keys") / "keys.json",
        CROWDED_KEYS,
        CROWDED_TENANTS,
    )
    keys_file = tmp_path_factory.mktemp("limit-keys") / "keys.json"
    keys = {tenant: create_key(keys_file, tenant, Role.USER) for tenant in ("plain", "partial", "vip")}
    data = json.loads(keys_file.read_text())
    # "partial" sets only a quota: its rate comes from the server's default; "vip" sets its own
    data["tenants"] = {"partial": {"max_prefixes": 5}, "vip": {"requests_per_minute": 1000}}
    keys_file.write_text(json.dumps(data))

    def store() -> str:
        return tmp_path_factory.mktemp("store").resolve().as_uri()

    launched = [
        ServerProcess(demo_model_dir, store()),
        ServerProcess(
            demo_model_dir,
            store(),
            env={"PREFIX_SERVE_TENANT_REQUESTS_PER_MINUTE": "5", "PREFIX_SERVE_TENANT_MAX_CONCURRENT": "1"},
        ),
        ServerProcess(
            demo_model_dir,
            store(),
            env={"PREFIX_SERVE_API_KEYS": str(keys_file), "PREFIX_SERVE_TENANT_REQUESTS_PER_MINUTE": "3"},
        ),
        ServerProcess(
            demo_model_dir, store(), env={**CROWDED_ENV, "PREFIX_SERVE_API_KEYS": str(crowded_keys)}
        ),
    ]
    try:
        for server in launched:
            server.launch()
        for server in launched:
            server.wait_until_answering("/readyz")
        yield Servers(*launched, keys=keys)
    finally:
        for server in launched:
            server.terminate()
        for server in launched:
            server.close()


def test_auth_off_has_no_per_tenant_limits_by_default(servers: Servers) -> None:
    """More requests in flight at once than the auth-on default (64) allows: none is refused."""
    burst = AUTH_ON_MAX_CONCURRENT + 36
    with httpx.Client(
        base_url=servers.open_default.url, timeout=120, limits=httpx.Limits(max_connections=burst)
    ) as client:

        def one(i: int) -> int:
            body = {"prompt": f"{PROMPT} {i}", "max_new_tokens": 30}
            return client.post("/v1/generate", json=body).status_code

        with ThreadPoolExecutor(burst) as pool:
            statuses = list(pool.map(one, range(burst)))
    assert statuses == [200] * burst
    assert (
        "per-tenant limits (auth off): no rate limit, no concurrency limit"
        in servers.open_default.log_tail(100_000)
    )


def test_auth_off_limits_come_from_the_options(servers: Servers) -> None:
    log = servers.open_limited.log_tail(100_000)
    assert "per-tenant limits (auth off): 5 requests/minute, 1 in flight" in log
    with httpx.Client(base_url=servers.open_limited.url, timeout=60) as client:
        started = time.monotonic()
        body = {"prompt": PROMPT, "max_new_tokens": 20, "stream": True}
        with client.stream("POST", "/v1/generate", json=body) as first:  # takes the one slot
            assert first.status_code == 200
            lines = first.iter_lines()
            next(lines)  # it is running
            second = client.post("/v1/generate", json=ONE_TOKEN)
            assert second.status_code == 429 and "in flight" in second.json()["error"]["message"]
            assert int(second.headers["retry-after"]) >= 1
            for _ in lines:  # to its end: the slot comes back
                pass

        def judged_by_the_rate() -> httpx.Response | None:  # a concurrency refusal takes no rate token
            answer = client.post("/v1/generate", json=ONE_TOKEN)
            in_flight = answer.status_code == 429 and "in flight" in answer.json()["error"]["message"]
            return None if in_flight else answer

        admitted = 0
        while (refused := wait_until(judged_by_the_rate, "the stream's slot is free")).status_code == 200:
            admitted += 1
        elapsed = time.monotonic() - started
    # 5 per minute: the stream took one; the bucket refills one every 12 s
    assert 4 <= admitted <= 4 + int(elapsed // 12)
    assert refused.status_code == 429 and refused.json()["error"]["type"] == "rate_limited"
    assert 1 <= int(refused.headers["retry-after"]) <= 12
    assert "5 requests per minute" in refused.json()["error"]["message"]


def test_a_tenant_without_its_own_limit_gets_the_option(servers: Servers) -> None:
    log = servers.keyed.log_tail(100_000)
    assert "per-tenant limits (tenants without their own in the keys file): 3 requests/minute, " in log
    assert f"{AUTH_ON_MAX_CONCURRENT} in flight" in log  # not set: the auth-on default

    def statuses(tenant: str, count: int) -> list[int]:
        headers = {"Authorization": f"Bearer {servers.keys[tenant]}"}
        with httpx.Client(base_url=servers.keyed.url, headers=headers, timeout=60) as client:
            return [client.post("/v1/generate", json=ONE_TOKEN).status_code for _ in range(count)]

    assert statuses("plain", 4) == [200, 200, 200, 429]  # no entry: the option's 3
    assert statuses("partial", 4) == [200, 200, 200, 429]  # an entry without a rate: the option's 3
    assert statuses("vip", 10) == [200] * 10  # its own entry


def test_default_limits_follow_auth(tmp_path: Path) -> None:
    keys_file = tmp_path / "keys.json"
    create_key(keys_file, "acme", Role.ADMIN)
    keys_file.write_text(
        json.dumps({**json.loads(keys_file.read_text()), "tenants": {"acme": {"max_concurrent": 2}}})
    )

    off = load_auth_config(None)
    assert (off.default_limits.requests_per_minute, off.default_limits.max_concurrent) == (None, None)
    on = load_auth_config(keys_file)
    assert on.default_limits == TenantLimits(
        requests_per_minute=AUTH_ON_REQUESTS_PER_MINUTE, max_concurrent=AUTH_ON_MAX_CONCURRENT
    )
    assert on.limits_for("acme") == TenantLimits(requests_per_minute=600, max_concurrent=2)
    chosen = load_auth_config(keys_file, requests_per_minute=0, max_concurrent=8)  # 0 = no limit
    assert chosen.limits_for("other") == TenantLimits(requests_per_minute=None, max_concurrent=8)
    assert chosen.limits_for("acme") == TenantLimits(requests_per_minute=None, max_concurrent=2)
    set_off = load_auth_config(None, requests_per_minute=10)
    assert (set_off.default_limits.requests_per_minute, set_off.default_limits.max_concurrent) == (10, None)


def test_prefix_quotas_have_options_and_zero_is_no_limit_everywhere(tmp_path: Path) -> None:
    """Auth off holds no quota unless an option sets one; auth on defaults to 1,000 prefixes and 1 GiB;
    the options set the defaults; 0 in the keys file is no limit, as on the command line."""
    keys_file = tmp_path / "keys.json"
    create_key(keys_file, "acme", Role.ADMIN)
    tenants = {"acme": {"max_prefixes": 0, "requests_per_minute": 0, "max_concurrent": 0}}
    keys_file.write_text(json.dumps({**json.loads(keys_file.read_text()), "tenants": tenants}))

    off = load_auth_config(None).default_limits
    assert (off.max_prefixes, off.max_prefix_bytes) == (None, None)
    assert off.quota == Quota(None, None)
    on = load_auth_config(keys_file)
    assert (on.default_limits.max_prefixes, on.default_limits.max_prefix_bytes) == (1000, 1 << 30)
    acme = on.limits_for("acme")
    assert (acme.max_prefixes, acme.requests_per_minute, acme.max_concurrent) == (None, None, None)
    assert acme.max_prefix_bytes == 1 << 30  # left out: the server's default
    chosen = load_auth_config(keys_file, max_prefixes=20_000, max_prefix_bytes=0).default_limits
    assert chosen.quota == Quota(max_prefixes=20_000, max_bytes=None)


# -- 16 clients at once, and the slot of a tenant with one ---------------------------------------------


def _client(server: ServerProcess, key: str) -> httpx.Client:
    return httpx.Client(base_url=server.url, headers={"Authorization": f"Bearer {key}"}, timeout=120)


def _admitted_at_once(client: httpx.Client) -> None:
    """The tenant's next request is admitted, without waiting: its slot was given back before the answer
    that ended the previous one."""
    answer = client.post("/v1/generate", json=ONE_TOKEN)
    assert answer.status_code == 200, answer.text


def _admitted_soon(client: httpx.Client, what: str) -> None:
    """The tenant's next request is admitted once the server has ended the previous one on its own time
    (a client that left): refusals meanwhile are the concurrency limit's, nothing else."""

    def admitted() -> bool:
        answer = client.post("/v1/generate", json=ONE_TOKEN)
        if answer.status_code == 200:
            return True
        assert answer.status_code == 429 and "in flight" in answer.json()["error"]["message"], answer.text
        return False

    wait_until(admitted, what)


def _upload(server: ServerProcess, admin_key: str, task_id: str, blob: bytes) -> None:
    with _client(server, admin_key) as admin:
        files = {"file": ("p.safetensors", blob)}
        assert admin.put(f"/v1/admin/prefixes/{task_id}", files=files).status_code in (200, 201)


def test_16_clients_at_once_get_exactly_the_requests_per_minute(servers: Servers) -> None:
    """``burst`` may make 5 requests a minute (a bucket of 5, one more every 12 s): of 16 sent at once, 5
    are admitted (more only if the burst itself outlasted 12 s) and the rest are 429 with ``Retry-After``."""
    server = servers.crowded
    start = threading.Barrier(CLIENTS, timeout=PATIENCE_S)

    def one(_: int) -> httpx.Response:
        with _client(server, "burst-user") as client:
            start.wait()
            return client.post("/v1/generate", json=ONE_TOKEN)

    started = time.monotonic()
    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(one, range(CLIENTS)))
    elapsed = time.monotonic() - started
    admitted = [answer for answer in answers if answer.status_code == 200]
    refused = [answer for answer in answers if answer.status_code != 200]
    assert 5 <= len(admitted) <= 5 + int(elapsed // 12), [answer.text for answer in refused]
    for answer in refused:
        error = answer.json()["error"]
        assert answer.status_code == 429 and error["type"] == "rate_limited", answer.text
        assert "5 requests per minute" in error["message"]
        assert 1 <= int(answer.headers["retry-after"]) <= 12
    assert all(answer.json()["usage"]["completion_tokens"] == 1 for answer in admitted)
    wait_idle(server)


def test_16_clients_at_once_get_exactly_max_concurrent(servers: Servers) -> None:
    """``crowd`` may have 3 requests in flight: of 16 long streams opened at once, exactly 3 are admitted
    (they are held open until every client has its answer) and 13 are 429 with ``Retry-After: 1``; once
    the 3 are closed, their slots come back."""
    server = servers.crowded
    aborted = aborted_count(server)
    start = threading.Barrier(CLIENTS, timeout=PATIENCE_S)
    answered = threading.Barrier(CLIENTS, timeout=PATIENCE_S)

    def one(_: int) -> tuple[int, httpx.Headers, str]:
        body = {"prompt": PROMPT, "max_new_tokens": LONG, "stream": True}
        with _client(server, "crowd-user") as client:
            start.wait()
            with client.stream("POST", "/v1/generate", json=body) as response:
                text = "" if response.status_code == 200 else response.read().decode()
                answered.wait()  # an admitted stream stays open (in flight) until all 16 are judged
                return response.status_code, response.headers, text

    with ThreadPoolExecutor(CLIENTS) as pool:
        answers = list(pool.map(one, range(CLIENTS)))
    statuses = [status for status, _, _ in answers]
    assert statuses.count(200) == 3 and statuses.count(429) == CLIENTS - 3, statuses
    for status, headers, text in answers:
        if status == 429:
            error = json.loads(text)["error"]
            assert error["type"] == "rate_limited" and "the limit is 3" in error["message"]
            assert headers["retry-after"] == "1"
    wait_until(
        lambda: aborted_count(server) >= aborted + 3, "the server aborts the 3 streams whose clients left"
    )
    wait_idle(server)
    with _client(server, "crowd-user") as client:
        _admitted_at_once(client)


def test_the_slot_comes_back_after_every_end_and_refusal(servers: Servers, llama_base: BaseModel) -> None:
    """``serial`` may have one request in flight. After each way a request can end or be refused, the
    tenant's next request is admitted: a refusal before the limits judge it (a schema, size or name error)
    takes no slot, and one after (an unknown task, a full prefix cache, the engine's full queue), an end or
    a client that leaves gives it back. Where the answer ends the request, the slot is back before the
    answer (the next request is admitted at once); where the client leaves, once the server notices."""
    server = servers.crowded
    _upload(
        server,
        "holder-admin",
        "pinned",
        encode_native(random_prefix(llama_base, PREFIX_TOKENS, 1), llama_base.geometry),
    )
    _upload(
        server,
        "serial-admin",
        "mine",
        encode_native(random_prefix(llama_base, PREFIX_TOKENS, 2), llama_base.geometry),
    )
    with _client(server, "serial-user") as serial:
        # a normal end, JSON and streamed (the stream read to its [DONE])
        _admitted_at_once(serial)
        _admitted_at_once(serial)
        with serial.stream("POST", "/v1/generate", json={**ONE_TOKEN, "stream": True}) as streamed:
            assert [line for line in streamed.iter_lines() if line.startswith("data: ")][-1] == "data: [DONE]"
        _admitted_at_once(serial)

        # refusals: an unknown task (404), a prompt over the limit (413), an invalid task id (400), a body
        # that is not JSON (422), an OpenAI body with a field no one defines (400)
        model = serial.get("/v1/models").json()["data"][0]["id"]
        refusals = [
            (serial.post("/v1/generate", json={**ONE_TOKEN, "task_id": "no-such-task"}), 404, "not_found"),
            (
                serial.post("/v1/generate", json={**ONE_TOKEN, "prompt": "word " * 100}),
                413,
                "payload_too_large",
            ),
            (serial.post("/v1/generate", json={**ONE_TOKEN, "task_id": "bad id"}), 400, "invalid_request"),
            (
                serial.post("/v1/generate", content=b"{", headers={"content-type": "application/json"}),
                422,
                "validation_error",
            ),
            (
                serial.post(
                    "/v1/completions", json={"model": model, "prompt": PROMPT, "max_tokens": 1, "bogus": 1}
                ),
                400,
                "invalid_request_error",
            ),
        ]
        for answer, status, error_type in refusals:
            assert (answer.status_code, answer.json()["error"]["type"]) == (status, error_type), answer.text
            _admitted_at_once(serial)

        # the prefix cache is full of a prefix in use (another tenant's running request pins it): 503
        holder = HeldStreams(server.url, "holder-user", max_tokens=LONG)
        try:
            holder.open("pinned")
            holder.first_event()
            full = serial.post("/v1/generate", json={**ONE_TOKEN, "task_id": "mine"})
            assert (full.status_code, full.json()["error"]["type"]) == (503, "unavailable"), full.text
            assert full.headers["retry-after"] == "1"
            _admitted_at_once(serial)
        finally:
            holder.close()
        wait_idle(server)

        # the engine's queue is full (another tenant fills the batch and the queue): 429, after the gate
        holder = HeldStreams(server.url, "holder-user", max_tokens=LONG)
        try:
            for _ in range(BATCH):
                holder.open()
            wait_until(lambda: gauge(server, "running_requests") == BATCH, "the batch is full")
            for _ in range(QUEUE):
                holder.open()  # admitted: it waits in the queue
            assert gauge(server, "queue_depth") == QUEUE
            full = serial.post("/v1/generate", json=ONE_TOKEN)
            assert full.status_code == 429 and "at capacity" in full.json()["error"]["message"], full.text
            assert full.headers["retry-after"] == "1"
        finally:
            holder.close()
        wait_idle(server)
        _admitted_at_once(serial)

        # a client that hangs up on its stream: the server aborts the request and gives the slot back
        aborted = aborted_count(server)
        with serial.stream(
            "POST", "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": LONG, "stream": True}
        ) as left:
            assert left.status_code == 200
            next(line for line in left.iter_lines() if line.startswith("data: "))
        wait_until(lambda: aborted_count(server) > aborted, "the server aborts the stream its client left")
        _admitted_soon(serial, "the slot of the stream whose client left is given back")

        # a client that hangs up on a JSON request while it runs (499)
        aborted = aborted_count(server)
        body = json.dumps({"prompt": PROMPT, "max_new_tokens": LONG}).encode()
        with socket.create_connection(("127.0.0.1", server.port), timeout=30) as raw:
            raw.sendall(
                b"POST /v1/generate HTTP/1.1\r\nHost: 127.0.0.1\r\nAuthorization: Bearer serial-user\r\n"
                b"Content-Type: application/json\r\nContent-Length: "
                + str(len(body)).encode()
                + b"\r\n\r\n"
                + body
            )
            wait_until(
                lambda: gauge(server, "running_requests") == 1, "the server reports the request running"
            )
        wait_until(lambda: aborted_count(server) > aborted, "the server aborts the request its client left")
        _admitted_soon(serial, "the slot of the request whose client left is given back")
    wait_idle(server)


def test_a_full_prefix_cache_answers_503_with_retry_after_until_its_prefix_is_unpinned(
    servers: Servers, llama_base: BaseModel
) -> None:
    """The prefix cache holds one prefix; a running stream pins it. A request for another task cannot be
    placed: 503 ``unavailable`` with ``Retry-After: 1`` (OpenAI's shape on the OpenAI route). Once the
    stream ends, the same request is served (the unpinned prefix is evicted)."""
    server = servers.crowded
    for seed, task in enumerate(("first", "second")):
        blob = encode_native(random_prefix(llama_base, PREFIX_TOKENS, 10 + seed), llama_base.geometry)
        _upload(server, "holder-admin", task, blob)
    holder = HeldStreams(server.url, "holder-user", max_tokens=LONG)
    with _client(server, "holder-user") as client:
        try:
            holder.open("first")
            holder.first_event()  # running, its prefix pinned
            refused = client.post("/v1/generate", json={**ONE_TOKEN, "task_id": "second"})
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            error = refused.json()["error"]
            assert error["type"] == "unavailable" and "prefix cache is full" in error["message"]
            body = {"model": "second", "prompt": PROMPT, "max_tokens": 1}
            refused = client.post("/v1/completions", json=body)
            assert refused.status_code == 503 and refused.headers["retry-after"] == "1", refused.text
            error = refused.json()["error"]
            assert (error["type"], error["code"]) == ("server_error", "unavailable")
        finally:
            holder.close()
        wait_until(lambda: gauge(server, "prefix_cache_pinned_count") == 0, "the stream's prefix is unpinned")
        served = client.post("/v1/generate", json={**ONE_TOKEN, "task_id": "second"})
        assert served.status_code == 200, served.text
    wait_idle(server)
