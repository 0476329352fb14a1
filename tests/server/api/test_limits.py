"""Server-wide limits and overload over real HTTP: the right 4xx, nothing stored, the server healthy."""

from __future__ import annotations

import time
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.api.errors import is_openai_path
from server.engine.base_model import BaseModel
from testing.server_process import ServerProcess
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

LIMITS = {
    "PREFIX_SERVE_MAX_QUEUE": "2",
    "PREFIX_SERVE_MAX_BATCH_SIZE": "2",
    "PREFIX_SERVE_MAX_UPLOAD_BYTES": "20000",
}


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, store: Path) -> Iterator[httpx.Client]:
    with (
        live_server(demo_model_dir, store, env=LIMITS) as url,
        httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client,
    ):
        yield client


def test_oversize_upload_is_refused_and_nothing_is_stored(
    client: httpx.Client, store: Path, llama_base: BaseModel
) -> None:
    blob = encode_native(random_prefix(llama_base, 100, seed=1), llama_base.geometry)
    assert len(blob) > 20000
    refused = client.put("/v1/admin/prefixes/big", files={"file": ("p.safetensors", blob)})
    assert refused.status_code == 413 and refused.json()["error"]["type"] == "payload_too_large"
    assert client.get("/v1/admin/prefixes/big").status_code == 404
    assert not list(store.rglob("*.safetensors")) and not list(store.rglob("big*"))
    assert client.get("/readyz").status_code == 200


def test_a_burst_past_the_queue_gets_429_promptly_and_the_admitted_complete(client: httpx.Client) -> None:
    def one(i: int) -> tuple[int, float, httpx.Response]:
        started = time.perf_counter()
        response = client.post("/v1/generate", json={"prompt": f"request {i}", "max_new_tokens": 40})
        return i, time.perf_counter() - started, response

    with ThreadPoolExecutor(24) as pool:
        outcomes = list(pool.map(one, range(24)))
    statuses = [response.status_code for _, _, response in outcomes]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 10 and statuses.count(200) >= 2
    for _, elapsed, response in outcomes:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limited"
            assert elapsed < 5.0  # shed at once, not after queueing
        else:
            assert len(response.json()["token_ids"]) == 40
    assert client.get("/readyz").status_code == 200


def test_graceful_shutdown_finishes_running_requests(demo_model_dir: Path, tmp_path: Path) -> None:
    with ServerProcess(demo_model_dir, tmp_path.as_uri()) as server, ThreadPoolExecutor(1) as pool:
        body = {"prompt": "hi", "max_new_tokens": 1000}
        running = pool.submit(httpx.post, f"{server.url}/v1/generate", json=body, timeout=60)
        time.sleep(0.5)
        server.terminate()  # SIGTERM: stop admitting, let running requests finish (grace 10 s)
        response = running.result()
        assert response.status_code == 200 and len(response.json()["token_ids"]) == 1000
        assert server.process.wait(timeout=30) == 0


def test_requests_cut_off_by_shutdown_answer_503_on_every_route(demo_model_dir: Path, tmp_path: Path) -> None:
    """With no grace left, a running request is aborted: the native and the OpenAI route both answer 503
    ``unavailable`` (retry elsewhere), never 200 with a partial text."""
    env = {"PREFIX_SERVE_SHUTDOWN_GRACE_S": "0"}
    with ServerProcess(demo_model_dir, tmp_path.as_uri(), env=env) as server, ThreadPoolExecutor(2) as pool:
        model = httpx.get(f"{server.url}/v1/models").json()["data"][0]["id"]
        calls = {
            "/v1/generate": {"prompt": "hi", "max_new_tokens": 1000},
            "/v1/completions": {"model": model, "prompt": "hi", "max_tokens": 1000, "ignore_eos": True},
        }
        running = {
            path: pool.submit(httpx.post, f"{server.url}{path}", json=body, timeout=60)
            for path, body in calls.items()
        }
        time.sleep(0.5)
        server.terminate()
        for path, future in running.items():
            response = future.result()
            assert response.status_code == 503, (path, response.text)
            error = response.json()["error"]  # OpenAI's shape on the OpenAI route: a server_error
            assert (error["type"], error.get("code")) == (
                ("server_error", "unavailable") if is_openai_path(path) else ("unavailable", None)
            )
        assert server.process.wait(timeout=30) == 0
