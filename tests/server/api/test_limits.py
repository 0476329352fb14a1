"""Server-wide limits and overload over real HTTP: the right 4xx, nothing stored, the server healthy; a
request past the server's time limit ends with ``deadline_exceeded`` on every route, JSON or streamed;
SIGTERM lets running requests finish, or answers 503 once the grace is spent."""

from __future__ import annotations

import json
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.api.errors import is_openai_path
from server.engine.base_model import BaseModel
from testing.server_process import ServerProcess, metric
from testing.waiting import wait_until
from tests.server.api.live_server import gauge
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

LIMITS = {
    "PREFIX_SERVE_MAX_QUEUE": "2",
    "PREFIX_SERVE_MAX_BATCH_SIZE": "2",
    "PREFIX_SERVE_MAX_UPLOAD_BYTES": "20000",
}
TIME_LIMIT_S = 2.0  # the deadline server's PREFIX_SERVE_REQUEST_TIMEOUT_S
# greedy from "hi", the demo model writes no end-of-sequence token in this many: a request this long ends
# by its limit, and takes far longer than TIME_LIMIT_S (or than the wait for it to be seen running)
LONG = 1800
FINISH_REASONS = ("length", "stop", "eos", "aborted", "deadline", "error")


@dataclass(frozen=True)
class Servers:
    limited: ServerProcess  # a small queue and batch, a small upload limit
    deadline: ServerProcess  # requests end after TIME_LIMIT_S


@pytest.fixture(scope="module")
def store(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return tmp_path_factory.mktemp("store")


@pytest.fixture(scope="module")
def servers(demo_model_dir: Path, store: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Servers]:
    launched = Servers(
        ServerProcess(demo_model_dir, store.resolve().as_uri(), env=LIMITS),
        ServerProcess(
            demo_model_dir,
            tmp_path_factory.mktemp("deadline-store").resolve().as_uri(),
            env={"PREFIX_SERVE_REQUEST_TIMEOUT_S": str(TIME_LIMIT_S)},
        ),
    )
    processes = (launched.limited, launched.deadline)
    try:
        for process in processes:
            process.launch()  # both load their models at once
        for process in processes:
            process.wait_until_answering("/readyz")
        yield launched
    finally:
        for process in processes:
            process.terminate()
        for process in processes:
            process.close()


@pytest.fixture(scope="module")
def client(servers: Servers) -> Iterator[httpx.Client]:
    limits = httpx.Limits(max_connections=64)
    with httpx.Client(base_url=servers.limited.url, timeout=120, limits=limits) as client:
        yield client


def _finished(url: str) -> float:
    """Generation requests that have left the engine, however they ended."""
    return sum(
        metric(url, "prefix_serve_generation_finished_total", reason=reason) for reason in FINISH_REASONS
    )


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


def test_a_burst_past_the_queue_gets_429_at_once_and_the_admitted_complete(
    client: httpx.Client, servers: Servers
) -> None:
    finished_before = _finished(servers.limited.url)

    def one(i: int) -> httpx.Response:
        return client.post("/v1/generate", json={"prompt": f"request {i}", "max_new_tokens": 40})

    with ThreadPoolExecutor(24) as pool:
        responses = list(pool.map(one, range(24)))
    statuses = [response.status_code for response in responses]
    assert set(statuses) <= {200, 429} and statuses.count(429) >= 10 and statuses.count(200) >= 2
    for response in responses:
        if response.status_code == 429:
            assert int(response.headers["retry-after"]) >= 1
            assert response.json()["error"]["type"] == "rate_limited"
        else:
            assert len(response.json()["token_ids"]) == 40
    # shed at once, not after queueing: only the admitted ever entered (and left) the engine
    assert _finished(servers.limited.url) - finished_before == statuses.count(200)
    assert client.get("/readyz").status_code == 200


def test_a_request_past_the_time_limit_ends_with_deadline_on_every_route(servers: Servers) -> None:
    """``PREFIX_SERVE_REQUEST_TIMEOUT_S``: a JSON answer is 504 ``deadline_exceeded`` (OpenAI's shape on
    the OpenAI route); a native stream's final event says ``"finish_reason": "deadline"``; an OpenAI
    stream ends with an error event. Four requests at once, each far longer than the limit."""
    url = servers.deadline.url
    model = httpx.get(f"{url}/v1/models").json()["data"][0]["id"]
    deadlines_before = metric(url, "prefix_serve_generation_finished_total", reason="deadline")
    native = {"prompt": "hi", "max_new_tokens": LONG}
    openai = {"model": model, "prompt": "hi", "max_tokens": LONG, "ignore_eos": True}

    def answer(path: str, body: dict) -> httpx.Response:
        return httpx.post(f"{url}{path}", json=body, timeout=120)

    def events(path: str, body: dict) -> tuple[int, list[str]]:
        with httpx.stream("POST", f"{url}{path}", json={**body, "stream": True}, timeout=120) as response:
            data = [
                line.removeprefix("data: ") for line in response.iter_lines() if line.startswith("data: ")
            ]
            return response.status_code, data

    with ThreadPoolExecutor(4) as pool:
        native_json = pool.submit(answer, "/v1/generate", native)
        native_stream = pool.submit(events, "/v1/generate", native)
        openai_json = pool.submit(answer, "/v1/completions", openai)
        openai_stream = pool.submit(events, "/v1/completions", openai)

    refused = native_json.result()
    assert refused.status_code == 504, refused.text
    assert refused.json() == {
        "error": {"type": "deadline_exceeded", "message": "the request did not finish within its time limit"}
    }
    status, data = native_stream.result()
    assert status == 200 and data[-1] == "[DONE]"
    final = json.loads(data[-2])
    assert final["finish_reason"] == "deadline" and final["usage"]["completion_tokens"] < LONG
    assert all("token_id" in json.loads(event) for event in data[:-2])  # tokens until the end, then the end

    refused = openai_json.result()
    assert refused.status_code == 504, refused.text
    error = refused.json()["error"]
    assert (error["type"], error["code"], error["param"]) == ("server_error", "deadline_exceeded", None)
    status, data = openai_stream.result()
    assert status == 200 and data[-1] == "[DONE]"
    error = json.loads(data[-2])["error"]
    assert (error["type"], error["code"]) == ("server_error", "deadline_exceeded")
    assert all("choices" in json.loads(event) for event in data[:-2])

    assert metric(url, "prefix_serve_generation_finished_total", reason="deadline") - deadlines_before == 4
    assert httpx.get(f"{url}/readyz").status_code == 200


def test_graceful_shutdown_finishes_running_requests(demo_model_dir: Path, tmp_path: Path) -> None:
    # a grace no loaded machine runs out of: what is shown is that the running request finishes
    env = {"PREFIX_SERVE_SHUTDOWN_GRACE_S": "240"}
    with (
        ServerProcess(demo_model_dir, tmp_path.as_uri(), env=env) as server,
        ThreadPoolExecutor(1) as pool,
    ):
        body = {"prompt": "hi", "max_new_tokens": 200}
        running = pool.submit(httpx.post, f"{server.url}/v1/generate", json=body, timeout=300)
        wait_until(lambda: gauge(server, "running_requests") == 1, "the server reports the request running")
        server.terminate()  # SIGTERM: stop admitting, let running requests finish within the grace
        response = running.result()
        assert response.status_code == 200 and len(response.json()["token_ids"]) == 200
        assert server.process.wait(timeout=60) == 0


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
        wait_until(lambda: gauge(server, "running_requests") == 2, "the server reports both requests running")
        server.terminate()
        for path, future in running.items():
            response = future.result()
            assert response.status_code == 503, (path, response.text)
            error = response.json()["error"]  # OpenAI's shape on the OpenAI route: a server_error
            assert (error["type"], error.get("code")) == (
                ("server_error", "unavailable") if is_openai_path(path) else ("unavailable", None)
            )
        assert server.process.wait(timeout=30) == 0
