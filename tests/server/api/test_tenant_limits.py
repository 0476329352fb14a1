"""Per-tenant rate and concurrency limits as the serve options set them, over real HTTP: off by default
with auth off (one local tenant), set by ``--tenant-requests-per-minute`` / ``--tenant-max-concurrent``
(or their ``PREFIX_SERVE_*`` variables), and the defaults of tenants without an entry in the keys file."""

from __future__ import annotations

import json
import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from server.api.auth import (
    AUTH_ON_MAX_CONCURRENT,
    AUTH_ON_REQUESTS_PER_MINUTE,
    Role,
    TenantLimits,
    create_key,
    load_auth_config,
)
from testing.server_process import ServerProcess

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time"
ONE_TOKEN = {"prompt": PROMPT, "max_new_tokens": 1}


@dataclass(frozen=True)
class Servers:
    open_default: ServerProcess  # auth off, no limit options
    open_limited: ServerProcess  # auth off, 5 requests/minute and 1 in flight
    keyed: ServerProcess  # auth on, 3 requests/minute for tenants without their own
    keys: dict[str, str]  # tenant -> user key


@pytest.fixture(scope="module")
def servers(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
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
        admitted = 0
        while True:
            refused = client.post("/v1/generate", json=ONE_TOKEN)
            if refused.status_code == 200:
                admitted += 1
            elif "in flight" in refused.json()["error"]["message"]:  # the stream's slot, being released
                time.sleep(0.05)
            else:
                break
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
