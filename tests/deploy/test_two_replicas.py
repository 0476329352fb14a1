"""Two replicas on one machine: two server processes sharing one real Redis, the repo's nginx config in
front routing by X-Task-Id. Upload and generate through nginx and on each replica, task affinity,
hot swap across replicas (the other replica serves the new version from the next request on), and
fail-over when a replica dies."""

from __future__ import annotations

import subprocess
from collections.abc import Iterator
from contextlib import ExitStack
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from testing.ports import free_port
from testing.redis_server import running_redis
from testing.server_process import ServerProcess
from testing.waiting import wait_until
from tests.deploy.test_deploy_files import nginx_binary, render_nginx_config
from tests.server.engine.helpers import random_prefix

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "Once upon a time"
REPLICA_ENV = {"PREFIX_SERVE_PREFIX_RECONCILE_INTERVAL_S": "0.5"}


class Cluster:
    def __init__(self, nginx_url: str, processes: dict[str, ServerProcess], stack: ExitStack) -> None:
        self.nginx_url, self.processes, self.stack = nginx_url, processes, stack
        self.replicas = {name: process.url for name, process in processes.items()}  # name -> URL


@pytest.fixture(scope="module")
def cluster(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[Cluster]:
    workdir = tmp_path_factory.mktemp("cluster")
    with ExitStack() as stack:
        redis_server = stack.enter_context(running_redis(workdir / "redis"))
        processes = {
            name: ServerProcess(
                demo_model_dir, redis_server.url, env={**REPLICA_ENV, "PREFIX_SERVE_REPLICA_NAME": name}
            )
            for name in ("replica-a", "replica-b")
        }
        for process in processes.values():
            stack.callback(process.close)
            process.launch()  # both load their models at once
        for process in processes.values():
            process.wait_until_answering("/readyz")
        port = free_port()
        upstreams = [process.url.removeprefix("http://") for process in processes.values()]
        config = render_nginx_config(port, upstreams, workdir)
        nginx = subprocess.Popen([nginx_binary(), "-p", str(workdir), "-c", str(config), "-g", "daemon off;"])
        stack.callback(lambda: (nginx.terminate(), nginx.wait(10)))
        nginx_url = f"http://127.0.0.1:{port}"
        wait_until(lambda: _answers(f"{nginx_url}/healthz"), "nginx answers /healthz")
        yield Cluster(nginx_url, processes, stack)


def _answers(url: str) -> bool:
    try:
        return httpx.get(url, timeout=5).status_code == 200
    except httpx.TransportError:
        return False


def _generate(url: str, task_id: str) -> httpx.Response:
    body = {"task_id": task_id, "prompt": PROMPT, "max_new_tokens": 8}
    return httpx.post(f"{url}/v1/generate", json=body, headers={"X-Task-Id": task_id}, timeout=60)


def _upload(url: str, task_id: str, blob: bytes) -> httpx.Response:
    files = {"file": ("p.safetensors", blob)}
    return httpx.put(
        f"{url}/v1/admin/prefixes/{task_id}", files=files, headers={"X-Task-Id": task_id}, timeout=60
    )


def test_upload_through_nginx_serves_the_same_tokens_everywhere(
    cluster: Cluster, llama_base: BaseModel
) -> None:
    blob = encode_native(random_prefix(llama_base, 6, seed=41), llama_base.geometry)
    assert _upload(cluster.nginx_url, "shared", blob).status_code == 201
    through_nginx = _generate(cluster.nginx_url, "shared").json()
    for url in cluster.replicas.values():
        direct = _generate(url, "shared").json()
        assert (direct["token_ids"], direct["prefix_version"]) == (
            through_nginx["token_ids"],
            through_nginx["prefix_version"],
        )


def test_a_task_sticks_to_one_replica(cluster: Cluster, llama_base: BaseModel) -> None:
    served_by: dict[str, set[str]] = {}
    for i in range(8):
        task = f"affinity-{i}"
        assert (
            _upload(
                cluster.nginx_url,
                task,
                encode_native(random_prefix(llama_base, 2, seed=i), llama_base.geometry),
            ).status_code
            == 201
        )
        served_by[task] = {_generate(cluster.nginx_url, task).headers["x-served-by"] for _ in range(4)}
    assert all(len(replicas) == 1 for replicas in served_by.values()), served_by
    assert set().union(*served_by.values()) == set(cluster.replicas)  # the tasks spread over both


def test_a_swap_on_one_replica_is_served_by_the_other_from_the_next_request(
    cluster: Cluster, llama_base: BaseModel
) -> None:
    """Every acquire checks the task's version in the shared store first: once the upload on a has
    answered, b's very next request runs with the new version (no waiting for a feed or a reconcile)."""
    a, b = cluster.replicas["replica-a"], cluster.replicas["replica-b"]
    first = _upload(
        a, "swapped", encode_native(random_prefix(llama_base, 3, seed=1), llama_base.geometry)
    ).json()
    assert _generate(b, "swapped").json()["prefix_version"] == first["version"]  # b has it resident now
    second = _upload(
        a, "swapped", encode_native(random_prefix(llama_base, 3, seed=2), llama_base.geometry)
    ).json()
    assert _generate(b, "swapped").json()["prefix_version"] == second["version"]


def test_nginx_fails_over_when_a_replica_dies(cluster: Cluster, llama_base: BaseModel) -> None:
    blob = encode_native(random_prefix(llama_base, 4, seed=9), llama_base.geometry)
    assert _upload(cluster.nginx_url, "survivor", blob).status_code in (200, 201)
    home = _generate(cluster.nginx_url, "survivor").headers["x-served-by"]
    cluster.processes[home].kill9()  # SIGKILL, and wait until it is gone: its port refuses connections
    statuses = []
    for _ in range(10):
        response = _generate(cluster.nginx_url, "survivor")
        statuses.append((response.status_code, response.headers.get("x-served-by")))
    other = next(name for name in cluster.replicas if name != home)
    assert statuses == [(200, other)] * 10
