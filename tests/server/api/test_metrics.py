"""``GET /metrics`` over real HTTP: it parses as Prometheus text, and its counters move by exactly what
the requests did; label values are route templates, never raw paths."""

from __future__ import annotations

import json
import re
from collections.abc import Iterator
from pathlib import Path

import httpx
import pytest
from fastapi.testclient import TestClient
from prometheus_client import CollectorRegistry, Counter, generate_latest
from prometheus_client.parser import text_string_to_metric_families

from prefix_store.formats.native import encode_native
from server.api.app import create_app
from server.config import ServeSettings
from server.engine.base_model import BaseModel
from testing.waiting import wait_until
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


@pytest.mark.e2e
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
    generate_ok = {"method": "POST", "route": "/v1/generate", "status": "200"}
    read_ok = {"method": "GET", "route": "/v1/admin/prefixes/{task_id}", "status": "200"}
    unmatched = {"method": "GET", "route": "<unmatched>", "status": "404"}
    made = ((generate_ok, 3), (read_ok, 1), (unmatched, 1))

    def counted() -> Samples | None:  # a request is counted as it ends, just after its last byte
        samples = _scrape(server)
        counts = [
            _value(samples, "http_requests_total", **labels) - _value(before, "http_requests_total", **labels)
            for labels, _ in made
        ]
        return samples if all(count >= n for count, (_, n) in zip(counts, made, strict=True)) else None

    after = wait_until(counted, "the requests are counted")

    def delta(name: str, **labels: str) -> float:
        return _value(after, name, **labels) - _value(before, name, **labels)

    assert delta("http_requests_total", **generate_ok) == 3
    assert delta("http_request_duration_seconds_count", **generate_ok) == 3
    assert delta("http_requests_total", **read_ok) == 1
    assert delta("http_requests_total", **unmatched) == 1
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

    cached = sum(usage["cached_tokens"] for usage in usages)  # found cached: not prefilled again
    assert (
        delta("prefill_tokens_total") == prompt - cached and delta("prompt_cache_hit_tokens_total") == cached
    )
    assert delta("engine_steps_total") >= max(usage["completion_tokens"] for usage in usages)
    assert _value(after, "kv_blocks_used") == 0 and _value(after, "kv_bytes_used") == 0  # all given back
    assert _value(after, "kv_blocks_total") > 0 and _value(after, "kv_bytes_total") > 0
    assert _value(after, "kv_shared_prefixes") == 0 and _value(after, "kv_rows_sharing_prefixes") == 0


def test_each_app_keeps_its_own_registry() -> None:
    """Two apps in one process: no clash on registration, and neither counts the other's requests."""
    first, second = TestClient(create_app(ServeSettings())), TestClient(create_app(ServeSettings()))
    for _ in range(2):
        assert first.get("/healthz").status_code == 200
    healthz = {"method": "GET", "route": "/healthz", "status": "200"}
    assert _value(_scrape(first), "http_requests_total", **healthz) == 2
    assert _value(_scrape(second), "http_requests_total", **healthz) == 0


@pytest.mark.e2e
def test_every_served_route_has_its_label_and_unmatched_is_only_for_404s(server: httpx.Client) -> None:
    css = re.search(r'href="(/docs/assets/[^"]+\.css)"', server.get("/docs").text)
    assert css is not None
    routes = {"/docs": "/docs", "/redoc": "/redoc", "/openapi.json": "/openapi.json", "/health": "/health"}
    routes |= {"/healthz": "/healthz", css.group(1): "/docs/assets"}  # path -> route label
    before = _scrape(server)
    for path in routes:
        assert server.get(path).status_code == 200, path

    def delta(samples: Samples, route: str) -> float:
        labels = {"method": "GET", "route": route, "status": "200"}
        return _value(samples, "http_requests_total", **labels) - _value(
            before, "http_requests_total", **labels
        )

    def counted() -> Samples | None:  # a request is counted as it ends, just after its last byte
        samples = _scrape(server)
        return samples if all(delta(samples, route) >= 1 for route in routes.values()) else None

    after = wait_until(counted, "every route's request is counted")
    assert all(delta(after, route) == 1 for route in routes.values())
    assert delta(after, "<unmatched>") == 0


@pytest.mark.e2e
def test_the_scrape_has_no_created_series_and_says_what_the_tenant_counter_counts(
    server: httpx.Client,
) -> None:
    assert server.get("/v1/admin/prefixes").status_code == 200  # a tenant is counted
    text = server.get("/metrics").text
    assert "_created" not in text
    assert _value(_parse(text), "tenant_requests_total", tenant="default") >= 1
    help_text = next(
        line for line in text.splitlines() if line.startswith("# HELP prefix_serve_tenant_requests")
    )
    assert "authenticated" not in help_text and "auth off" in help_text


def test_other_registries_keep_their_created_series() -> None:
    """The series are dropped from the app's scrape only, not by prometheus_client's process-wide switch."""
    app = TestClient(create_app(ServeSettings()))
    assert app.get("/healthz").status_code == 200
    assert "_created" not in app.get("/metrics").text
    other = CollectorRegistry()
    Counter("other_requests", "another component's counter", registry=other).inc()
    assert "other_requests_created" in generate_latest(other).decode()
