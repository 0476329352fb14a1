"""Server-sent events, and hot swaps under concurrent load, over real HTTP."""

from __future__ import annotations

import json
import threading
from collections.abc import Iterator
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import httpx
import pytest

from prefix_store.formats.native import encode_native
from server.engine.base_model import BaseModel
from server.engine.generation import generate
from testing.waiting import wait_until
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix, request

pytestmark = pytest.mark.e2e  # starts servers or other processes

PROMPT = "The weather today is"
NEW_TOKENS = 6


@pytest.fixture(scope="module")
def client(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("store")) as url,
        httpx.Client(base_url=url, timeout=120, limits=httpx.Limits(max_connections=64)) as client,
    ):
        yield client


def _events(response: httpx.Response) -> list[object]:
    lines = [line for line in response.iter_lines() if line]
    assert all(line.startswith("data: ") for line in lines)
    return [
        line[len("data: ") :] if line == "data: [DONE]" else json.loads(line[len("data: ") :])
        for line in lines
    ]


def test_sse_streams_the_same_tokens_as_json(client: httpx.Client) -> None:
    body = {"prompt": PROMPT, "max_new_tokens": 12, "temperature": 0.7, "seed": 5}
    whole = client.post("/v1/generate", json=body).json()
    with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
        assert response.status_code == 200 and response.headers["content-type"].startswith(
            "text/event-stream"
        )
        events = _events(response)
    assert events[-1] == "[DONE]"
    final, tokens = events[-2], events[:-2]
    assert [e["token_id"] for e in tokens] == whole["token_ids"]
    assert "".join(e["text"] for e in tokens) == whole["text"]
    assert final["finish_reason"] == whole["finish_reason"] == "length"
    assert final["usage"] == whole["usage"]


def test_stream_errors_come_before_the_stream(client: httpx.Client) -> None:
    with client.stream(
        "POST", "/v1/generate", json={"prompt": PROMPT, "task_id": "missing", "stream": True}
    ) as r:
        assert r.status_code == 404 and json.loads(r.read())["error"]["type"] == "not_found"


def test_hot_swap_under_load(client: httpx.Client, llama_base: BaseModel) -> None:
    """16 clients generate on task T while T is replaced 20 times: no failures, every answer is
    exactly its version's tokens, and a request started after a swap's 2xx uses that version or newer."""
    prefixes = [random_prefix(llama_base, 3 + i % 5, seed=100 + i) for i in range(21)]
    expected_by_blob = {}
    for prefix in prefixes:
        tokens = generate(
            llama_base,
            [request(llama_base, "r", PROMPT, prefix, max_new_tokens=NEW_TOKENS, ignore_eos=False)],
        )
        expected_by_blob[encode_native(prefix, llama_base.geometry)] = tokens[0].token_ids
    blobs = list(expected_by_blob)

    def upload(blob: bytes) -> str:
        response = client.put("/v1/admin/prefixes/T", files={"file": ("t.safetensors", blob)})
        assert response.status_code in (200, 201), response.text
        return response.json()["version"]

    expected = {upload(blobs[0]): expected_by_blob[blobs[0]]}
    acknowledged: list[str] = [next(iter(expected))]  # versions in upload order
    stop = threading.Event()
    results: list[tuple[int, str, list[int]]] = []  # (swaps acknowledged when sent, version, tokens)
    failures: list[str] = []

    def sequence(version: str) -> int:
        return int(version.split("-")[0])

    def generate_until_stopped() -> None:
        while not stop.is_set():
            floor = sequence(acknowledged[-1])
            response = client.post(
                "/v1/generate", json={"task_id": "T", "prompt": PROMPT, "max_new_tokens": NEW_TOKENS}
            )
            if response.status_code != 200:
                failures.append(response.text)
                continue
            body = response.json()
            results.append((floor, body["prefix_version"], body["token_ids"]))

    with ThreadPoolExecutor(16) as pool:
        workers = [pool.submit(generate_until_stopped) for _ in range(16)]
        for blob in blobs[1:]:
            answered = len(results)
            version = upload(blob)
            expected[version] = expected_by_blob[blob]
            acknowledged.append(version)
            # two answers between swaps, however slow the machine: the swaps interleave with generation
            wait_until(lambda answered=answered: len(results) >= answered + 2 or failures, "two more answers")
        stop.set()
        for worker in workers:
            worker.result()

    assert failures == []
    assert len(results) >= 40 and len({version for _, version, _ in results}) > 5
    for floor, version, tokens in results:
        assert version in expected, version
        assert tokens == expected[version], version
        assert sequence(version) >= floor


def test_stream_events_are_ascii_lines_whatever_the_text(client: httpx.Client) -> None:
    """Non-ASCII text arrives escaped: one line per event for any line-splitting client, same text."""
    body = {"prompt": PROMPT, "max_new_tokens": 24, "temperature": 1.5}
    seed, whole = next(
        (seed, answer)
        for seed in range(50)
        if not (answer := client.post("/v1/generate", json={**body, "seed": seed}).json())["text"].isascii()
    )
    with client.stream("POST", "/v1/generate", json={**body, "seed": seed, "stream": True}) as response:
        raw = response.read()
    assert raw.isascii()
    events = [line.removeprefix("data: ") for line in raw.decode().splitlines() if line]
    assert events[-1] == "[DONE]"
    assert "".join(json.loads(event)["text"] for event in events[:-2]) == whole["text"]
