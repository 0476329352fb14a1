"""API keys, roles, tenant isolation and per-tenant limits, end to end over real HTTP."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from prefix_store.prefix import Prefix
from server.api.app import create_app
from server.api.auth import Role, create_key, load_auth_config
from server.api.errors import is_openai_path
from server.config import ServeSettings
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from testing.server_process import metric
from testing.waiting import wait_until
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix, request

pytestmark = pytest.mark.e2e  # starts servers or other processes

PUBLIC_PATHS = {"/healthz", "/health", "/readyz", "/metrics"}
PROMPT = "Once upon a time"


@pytest.fixture(scope="module")
def keys(tmp_path_factory: pytest.TempPathFactory) -> tuple[Path, dict[str, str]]:
    keys_file = tmp_path_factory.mktemp("keys") / "keys.json"
    made = {
        f"{tenant}-{role}": create_key(keys_file, tenant, Role(role))
        for tenant in ("acme", "globex", "ratelimited", "serial", "tiny")
        for role in ("admin", "user")
    }
    data = json.loads(keys_file.read_text())
    data["tenants"] = {
        "ratelimited": {"requests_per_minute": 3},
        "serial": {"max_concurrent": 1},
        "tiny": {"max_prefixes": 1},
    }
    keys_file.write_text(json.dumps(data))
    assert all(key not in keys_file.read_text() for key in made.values())  # hashes only
    return keys_file, made


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, keys, tmp_path_factory: pytest.TempPathFactory) -> Iterator[str]:
    keys_file, _ = keys
    env = {"PREFIX_SERVE_API_KEYS": str(keys_file), "PREFIX_SERVE_MAX_REQUEST_BYTES": "4096"}
    with live_server(demo_model_dir, tmp_path_factory.mktemp("store"), env=env) as url:
        yield url


def _client(url: str, key: str | None) -> httpx.Client:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    return httpx.Client(base_url=url, headers=headers, timeout=60)


def _upload(client: httpx.Client, task_id: str, blob: bytes, **headers: str) -> httpx.Response:
    files = {"file": ("p.safetensors", blob)}
    return client.put(f"/v1/admin/prefixes/{task_id}", files=files, headers=headers)


def _routes() -> list[tuple[str, str, bool]]:
    """Every operation of the app's OpenAPI schema as (method, concrete path, admin only), so a new
    route cannot slip past these tests."""
    paths = create_app(ServeSettings()).openapi()["paths"]
    return [
        (method.upper(), re.sub(r"\{[^}]+\}", "some-task", path), path.startswith("/v1/admin"))
        for path, operations in paths.items()
        if path not in PUBLIC_PATHS
        for method in operations
    ]


def test_every_route_refuses_no_key_and_a_wrong_key(server: str) -> None:
    routes = _routes()
    assert len(routes) >= 6  # generate + the admin routes at least
    for key in (None, "ps-not-a-real-key"):
        with _client(server, key) as client:
            for method, path, _ in routes:
                response = client.request(method, path)
                assert response.status_code == 401, (method, path)
                error = response.json()["error"]
                if is_openai_path(path):  # OpenAI's shape and words
                    assert (error["type"], error["code"]) == ("invalid_request_error", "invalid_api_key")
                else:
                    assert error["type"] == "authentication_error" and "code" not in error
                assert response.headers["www-authenticate"] == "Bearer"


def test_the_public_paths_need_no_key(server: str) -> None:
    with _client(server, None) as client:
        for path in (*PUBLIC_PATHS, "/docs", "/redoc", "/openapi.json"):
            assert client.get(path).status_code == 200, path


def test_a_task_id_with_a_slash_is_judged_after_the_key(server: str, keys) -> None:
    """Like any admin route: 401 without a key, 403 for a user key, then 400 for the name."""
    _, made = keys
    for key, status in ((None, 401), (made["acme-user"], 403), (made["acme-admin"], 400)):
        with _client(server, key) as client:
            for method in ("GET", "PUT", "DELETE"):
                assert client.request(method, "/v1/admin/prefixes/team/summarize").status_code == status


def test_user_keys_get_403_on_admin_routes(server: str, keys) -> None:
    _, made = keys
    with _client(server, made["acme-user"]) as client:
        for method, path, admin_only in _routes():
            if admin_only:
                response = client.request(method, path)
                assert response.status_code == 403, (method, path)
                assert made["acme-user"] not in response.text


def _generate_task(client: httpx.Client, task_id: str | None) -> httpx.Response:
    return client.post("/v1/generate", json={"task_id": task_id, "prompt": PROMPT, "max_new_tokens": 10})


def _engine_tokens(base: BaseModel, prefix: Prefix) -> list[int]:
    """What the engine, run in this process, generates for ``PROMPT`` on ``prefix`` (as the route does)."""
    return generate(base, [request(base, "r", PROMPT, prefix, max_new_tokens=10, ignore_eos=False)])[
        0
    ].token_ids


def test_tenants_are_isolated(server: str, keys, llama_base: BaseModel) -> None:
    """acme and globex each upload a task named "t", with prefixes of their own. Each generates with its own
    "t" (the engine's tokens for that prefix), and neither can read, list, download, overwrite or delete the
    other's: to each tenant, "t" is its own task or no task at all."""
    _, made = keys
    acme_admin, acme_user = _client(server, made["acme-admin"]), _client(server, made["acme-user"])
    globex_admin, globex_user = _client(server, made["globex-admin"]), _client(server, made["globex-user"])
    prefixes = {"acme": random_prefix(llama_base, 5, seed=3), "globex": random_prefix(llama_base, 5, seed=4)}
    blobs = {tenant: encode_native(prefix, llama_base.geometry) for tenant, prefix in prefixes.items()}
    expected = {tenant: _engine_tokens(llama_base, prefix) for tenant, prefix in prefixes.items()}
    assert expected["acme"] != expected["globex"]  # the two prefixes lead to different tokens

    assert _upload(acme_admin, "t", blobs["acme"]).status_code == 201
    with_prefix = _generate_task(acme_user, "t").json()
    assert with_prefix["token_ids"] == expected["acme"]
    assert (
        with_prefix["token_ids"] != _generate_task(acme_user, None).json()["token_ids"]
    )  # the prefix is used

    for client in (globex_admin, globex_user):  # B cannot see, use or touch A's task
        assert _generate_task(client, "t").status_code == 404
    assert globex_admin.get("/v1/admin/prefixes/t").status_code == 404
    assert globex_admin.get("/v1/admin/prefixes/t/download").status_code == 404
    assert globex_admin.delete("/v1/admin/prefixes/t").status_code == 404
    named = {"If-Match": with_prefix["prefix_version"]}  # naming A's version does not reach it either:
    refused = globex_admin.delete("/v1/admin/prefixes/t", headers=named)  # the answer for a missing task
    missing = globex_admin.delete("/v1/admin/prefixes/never-made", headers=named)
    assert (refused.status_code, refused.json()["error"]["type"]) == (
        missing.status_code,
        missing.json()["error"]["type"],
    )
    assert refused.status_code in (404, 412)
    listed = globex_admin.get("/v1/admin/prefixes").json()
    assert listed["prefixes"] == [] and listed["usage"]["prefixes"] == 0 and listed["next_cursor"] is None

    assert (
        _upload(globex_admin, "t", blobs["globex"]).status_code == 201
    )  # B's own "t": created, not replaced
    for user, tenant in ((acme_user, "acme"), (globex_user, "globex")):  # each generates with its own "t"
        assert _generate_task(user, "t").json()["token_ids"] == expected[tenant], tenant
    versions = {}
    for admin, tenant in ((acme_admin, "acme"), (globex_admin, "globex")):  # each reads only its own
        record = admin.get("/v1/admin/prefixes/t").json()
        assert record["version"].endswith(hashlib.sha256(blobs[tenant]).hexdigest()[:12]), tenant
        assert admin.get("/v1/admin/prefixes/t/download").content == blobs[tenant], tenant
        listed = admin.get("/v1/admin/prefixes").json()["prefixes"]
        assert [(p["task_id"], p["version"]) for p in listed] == [("t", record["version"])], tenant
        versions[tenant] = record["version"]
    assert versions["acme"] == with_prefix["prefix_version"]

    # A cannot overwrite or delete B's "t" by naming its version: that is not the version of A's "t"
    named = {"If-Match": versions["globex"]}
    assert _upload(acme_admin, "t", blobs["acme"], **named).status_code == 412
    assert acme_admin.delete("/v1/admin/prefixes/t", headers=named).status_code == 412

    # A replaces its own "t": B's is untouched
    replacement = random_prefix(llama_base, 5, seed=5)
    replaced = _upload(acme_admin, "t", encode_native(replacement, llama_base.geometry))
    assert replaced.status_code == 200
    assert _generate_task(acme_user, "t").json()["token_ids"] == _engine_tokens(llama_base, replacement)
    assert globex_admin.get("/v1/admin/prefixes/t").json()["version"] == versions["globex"]
    assert _generate_task(globex_user, "t").json()["token_ids"] == expected["globex"]

    # A deletes its own "t": B's stays, and A's is gone for A
    assert acme_admin.delete("/v1/admin/prefixes/t").status_code == 204
    assert _generate_task(acme_user, "t").status_code == 404
    assert acme_admin.get("/v1/admin/prefixes/t").status_code == 404
    assert globex_admin.get("/v1/admin/prefixes/t/download").content == blobs["globex"]
    assert _generate_task(globex_user, "t").json()["token_ids"] == expected["globex"]


def test_requests_per_minute_limit(server: str, keys) -> None:
    _, made = keys
    with _client(server, made["ratelimited-user"]) as client:
        statuses = [
            client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1}).status_code
            for _ in range(4)
        ]
        assert statuses == [200, 200, 200, 429]
        refused = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1})
        assert int(refused.headers["retry-after"]) >= 1 and refused.json()["error"]["type"] == "rate_limited"
    with _client(server, made["acme-user"]) as other:  # another tenant is unaffected
        assert other.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1}).status_code == 200


def test_concurrent_requests_limit(server: str, keys) -> None:
    _, made = keys
    with _client(server, made["serial-user"]) as client:
        body = {"prompt": PROMPT, "max_new_tokens": 1000, "stream": True}
        aborted = metric(server, "prefix_serve_generation_finished_total", reason="aborted")
        with client.stream("POST", "/v1/generate", json=body) as first:
            assert first.status_code == 200
            lines = first.iter_lines()  # keep the iterator: dropping it closes the connection
            next(lines)  # the first request is running
            second = client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1})
            assert second.status_code == 429 and "in flight" in second.json()["error"]["message"]
        # the first stream was closed early: the server aborts it (1000 tokens would take far longer), and
        # its slot comes back
        wait_until(
            lambda: metric(server, "prefix_serve_generation_finished_total", reason="aborted") > aborted,
            "the server aborts the request whose client left",
        )
        wait_until(
            lambda: (
                client.post("/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1}).status_code == 200
            ),
            "the tenant's slot is released after its client disconnected",
        )


def test_prefix_count_quota(server: str, keys, llama_base: BaseModel) -> None:
    """A tenant with max_prefixes 1: eight uploads of new tasks at once, exactly one stored; a replace is
    within the quota; the others get 409 quota_exceeded; the listing says the usage and the limit."""
    _, made = keys
    blob = encode_native(random_prefix(llama_base, 2, seed=1), llama_base.geometry)
    with _client(server, made["tiny-admin"]) as client, ThreadPoolExecutor(8) as pool:
        answers = list(pool.map(lambda i: _upload(client, f"racer-{i}", blob), range(8)))
        assert sorted(a.status_code for a in answers) == [201] + [409] * 7
        (stored,) = [f"racer-{i}" for i, a in enumerate(answers) if a.status_code == 201]
        assert _upload(client, stored, blob).status_code == 200  # a replace is within the quota
        refused = _upload(client, "second", blob)
        assert refused.status_code == 409 and refused.json()["error"]["type"] == "quota_exceeded"
        listed = client.get("/v1/admin/prefixes").json()
        assert [p["task_id"] for p in listed["prefixes"]] == [stored]
        assert listed["usage"] == {
            "prefixes": 1,
            "bytes": len(blob),
            "max_prefixes": 1,
            "max_prefix_bytes": 1 << 30,
        }


def test_listings_come_in_pages(server: str, keys, llama_base: BaseModel) -> None:
    _, made = keys
    blob = encode_native(random_prefix(llama_base, 2, seed=2), llama_base.geometry)
    with _client(server, made["globex-admin"]) as client:
        names = [f"page-{i}" for i in range(5)]
        before = client.get("/v1/admin/prefixes").json()["usage"]["prefixes"]  # other tests' tasks
        for name in names:
            assert _upload(client, name, blob).status_code == 201
        seen, cursor, pages = [], None, 0
        while True:
            params = {"limit": 2, **({"cursor": cursor} if cursor else {})}
            page = client.get("/v1/admin/prefixes", params=params).json()
            assert len(page["prefixes"]) <= 2 and page["usage"]["prefixes"] == before + 5
            seen += [p["task_id"] for p in page["prefixes"]]
            pages += 1
            cursor = page["next_cursor"]
            if cursor is None:
                break
        assert [name for name in seen if name.startswith("page-")] == names
        assert len(seen) == before + 5 and pages == -(-(before + 5) // 2)
        bad = client.get("/v1/admin/prefixes", params={"cursor": "../x"})
        assert bad.status_code == 400 and bad.json()["error"]["type"] == "invalid_request"
        for limit in (0, 1001):
            out = client.get("/v1/admin/prefixes", params={"limit": limit})
            assert out.status_code == 422 and out.json()["error"]["type"] == "validation_error"
        for name in names:
            assert client.delete(f"/v1/admin/prefixes/{name}").status_code == 204


def test_body_cap_counts_streamed_bytes(server: str, keys) -> None:
    _, made = keys
    with _client(server, made["acme-user"]) as client:
        declared = client.post(
            "/v1/generate", content=b"x" * 5000, headers={"content-type": "application/json"}
        )
        assert declared.status_code == 413

        def chunks() -> Iterator[bytes]:  # no Content-Length: the server must count
            yield b'{"prompt": "'
            for _ in range(10):
                yield b"y" * 1000
            yield b'"}'

        streamed = client.post("/v1/generate", content=chunks(), headers={"content-type": "application/json"})
        assert streamed.status_code == 413 and streamed.json()["error"]["type"] == "payload_too_large"
        assert client.get("/healthz").status_code == 200


def test_request_ids_are_echoed_or_made(server: str, keys) -> None:
    _, made = keys
    with _client(server, made["acme-user"]) as client:
        echoed = client.post(
            "/v1/generate", json={"prompt": PROMPT, "max_new_tokens": 1}, headers={"X-Request-Id": "abc-123"}
        )
        assert echoed.headers["x-request-id"] == "abc-123"
        assert len(client.get("/v1/nothing").headers["x-request-id"]) == 32


def test_keys_file_errors_are_clear(tmp_path: Path) -> None:
    bad = tmp_path / "keys.json"
    bad.write_text('{"keys": [{"tenant": "a", "role": "root", "sha256": "00"}]}')
    with pytest.raises(ValueError, match="malformed"):
        load_auth_config(bad)
    with pytest.raises(ValueError, match="does not exist"):
        load_auth_config(tmp_path / "missing.json")
    config = load_auth_config(None)
    assert not config.enabled and config.authenticate(None).tenant == "default"
