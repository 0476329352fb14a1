"""``GET /metrics`` over real HTTP: it parses as Prometheus text, and its counters move by exactly what
the requests did; label values are route templates, never raw paths."""

from __future__ import annotations

import json
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client.parser import text_string_to_metric_families

from prefix_store import encode_native
from server.api.app import create_app
from server.config import ServeSettings
from server.engine.base_model import BaseModel
from tests.server.api.live_server import live_server
from tests.server.engine.helpers import random_prefix

PROMPT = "The quick brown fox jumps over the lazy dog"
Samples = dict[tuple[str, frozenset[tuple[str, str]]], float]


@pytest.fixture(scope="module")
def server(demo_model_dir: Path, tmp_path_factory: pytest.TempPathFactory) -> Iterator[httpx.Client]:
    with (
        live_server(demo_model_dir, tmp_path_factory.mktemp("metrics-store")) as url,
        httpx.Client(base_url=url, timeout=60) as client,
    ):
        yield client


def _parse(text: str) -> Samples:
    return {
        (sample.name, frozenset(sample.labels.items())): sample.value
        for family in text_string_to_metric_families(text)
        for sample in family.samples
    }


def _scrape(client: httpx.Client | TestClient) -> Samples:
    response = client.get("/metrics")
    assert response.status_code == 200 and response.headers["content-type"].startswith("text/plain")
    return _parse(response.text)


def _value(samples: Samples, name: str, **labels: str) -> float:
    return samples.get((f"prefix_serve_{name}", frozenset(labels.items())), 0.0)


def _generate(client: httpx.Client, task_id: str | None, max_new_tokens: int) -> dict:
    body = {"prompt": PROMPT, "task_id": task_id, "max_new_tokens": max_new_tokens}
    answer = client.post("/v1/generate", json=body)
    assert answer.status_code == 200, answer.text
    return answer.json()["usage"]


def _generate_streaming(client: httpx.Client, task_id: str | None, max_new_tokens: int) -> dict:
    body = {"prompt": PROMPT, "task_id": task_id, "max_new_tokens": max_new_tokens, "stream": True}
    with client.stream("POST", "/v1/generate", json=body) as response:
        events = [line[6:] for line in response.iter_lines() if line.startswith("data: ")]
    assert events[-1] == "[DONE]"
    return json.loads(events[-2])["usage"]


def test_counters_move_by_what_the_requests_did(server: httpx.Client, llama_base: BaseModel) -> None:
    blob = encode_native(random_prefix(llama_base, 5, seed=3), llama_base.geometry)
    assert (
        server.put("/v1/admin/prefixes/counted", files={"file": ("p.safetensors", blob)}).status_code == 201
    )
    before = _scrape(server)

    usages = [
        _generate(server, "counted", 5),
        _generate(server, None, 7),
        _generate_streaming(server, "counted", 4),
    ]
    assert server.get("/v1/admin/prefixes/counted").status_code == 200
    assert server.get("/v1/no/such/route-xyz").status_code == 404
    after = _scrape(server)

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    generate_ok = {"method": "POST", "route": "/v1/generate", "status": "200"}
    assert delta("http_requests_total", **generate_ok) == 3
    assert delta("http_request_duration_seconds_count", **generate_ok) == 3
    assert delta("http_requests_total", method="GET", route="/v1/admin/prefixes/{task_id}", status="200") == 1
    assert delta("http_requests_total", method="GET", route="<unmatched>", status="404") == 1
    assert not any("xyz" in value or "counted" in value for _, labels in after for _, value in labels)
    assert delta("tenant_requests_total", tenant="default") == 4  # the 404 had no tenant

    completion = sum(usage["completion_tokens"] for usage in usages)
    prompt = sum(usage["prompt_tokens"] for usage in usages)
    assert delta("generated_tokens_total") == completion
    assert delta("tenant_tokens_total", tenant="default", kind="completion") == completion
    assert delta("prompt_tokens_total") == prompt
    assert delta("tenant_tokens_total", tenant="default", kind="prompt") == prompt
    assert delta("time_to_first_token_seconds_count") == 3
    assert sum(delta("generation_finished_total", reason=r) for r in ("length", "eos", "stop")) == 3

    assert _value(after, "queue_depth") == 0 and _value(after, "running_requests") == 0
    acquires = delta("prefix_cache_hits_total") + delta("prefix_cache_misses_total")
    assert acquires == 2 and delta("prefix_cache_hits_total") >= 1  # the second use finds it resident
    assert _value(after, "prefix_cache_resident_bytes") > 0
    assert _value(after, "prefix_load_seconds_count") >= 1


def test_each_app_keeps_its_own_registry() -> None:
    """Two apps in one process: no clash on registration, and neither counts the other's requests."""
    first, second = TestClient(create_app(ServeSettings())), TestClient(create_app(ServeSettings()))
    for _ in range(2):
        assert first.get("/healthz").status_code == 200
    healthz = {"method": "GET", "route": "/healthz", "status": "200"}
    assert _value(_scrape(first), "http_requests_total", **healthz) == 2
    assert _value(_scrape(second), "http_requests_total", **healthz) == 0
