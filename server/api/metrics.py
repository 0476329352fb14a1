"""Prometheus metrics (``GET /metrics``, no auth), one ``CollectorRegistry`` per app: several apps in one
process never share or clash. Label values are bounded: route *templates* (never raw paths), status
codes, finish reasons, and tenants (named by the keys file).

- HTTP: requests and latency by method, route template and status (a middleware), and requests per
  tenant (of the routes that identify the caller).
- Generation: time to first token, prompt and generated tokens (also per tenant), requests by how
  they ended (aborted and expired ones included), recorded by :meth:`ServerMetrics.observer` as the
  engine delivers each request's outputs.
- Read at scrape time, from what the lifespan attaches (:meth:`ServerMetrics.attach`): queue depth,
  running rows, pinned requests, engine steps, prefilled tokens and the KV pool (bytes and blocks used and
  in all, shared prefix blocks) from the engine, and the prefix cache's hits/misses/evictions/bytes/
  load latency from its ``stats()``.

Counters and histograms are exported without their ``*_created`` series (when each label set was first
seen): noise to a Prometheus server, which tracks resets itself. They are dropped from this app's
scrape only; ``prometheus_client``'s process-wide switch would change every other registry too.
"""

from __future__ import annotations

import time
from collections.abc import Callable, Iterator
from typing import Protocol

from fastapi import APIRouter, FastAPI, Request, Response
from prometheus_client import CollectorRegistry, Counter, Histogram, generate_latest
from prometheus_client.core import CounterMetricFamily, GaugeMetricFamily, Metric, SummaryMetricFamily
from prometheus_client.exposition import CONTENT_TYPE_PLAIN_0_0_4
from prometheus_client.process_collector import ProcessCollector
from starlette.types import ASGIApp, Message, Receive, Scope, Send

from prefix_store.cache.registry_stats import RegistryStats
from server.engine.core import EngineStats
from server.engine.request import RequestOutput

_NS = "prefix_serve"
_LATENCY_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2.5, 5, 10, 30, 60, 120, 300)
_TTFT_BUCKETS = (0.005, 0.01, 0.025, 0.05, 0.1, 0.25, 0.5, 1, 2, 5, 10, 30, 60)
_UNMATCHED = "<unmatched>"  # the route label of requests no route matched (404s): never the raw path
_METHODS = frozenset({"GET", "HEAD", "POST", "PUT", "PATCH", "DELETE", "OPTIONS"})  # others count as "other"

# RegistryStats fields exported as counters (cumulative) and gauges (current), with their help text
_CACHE_COUNTERS = {
    "hits": "acquires served by a resident prefix version",
    "misses": "acquires that started a load",
    "coalesced": "acquires that waited for a load already in progress",
    "host_hits": "loads served by the host-memory tier",
    "store_reads": "prefix blobs read from the store",
    "prefetches": "loads started by a new version, not by a request",
    "evictions": "unpinned versions evicted from the device to make room",
    "invalidations": "versions dropped because a newer version or a delete was seen",
    "load_failures": "prefix loads that failed",
    "served_during_outage": "acquires answered from a resident version while the store was down",
    "host_evictions": "versions evicted from the host-memory tier",
}
_CACHE_GAUGES = {
    "resident_bytes": "device bytes held by resident prefixes",
    "peak_resident_bytes": "most device bytes ever held by prefixes",
    "budget_bytes": "device byte budget for prefixes",
    "resident_count": "prefix versions resident on the device",
    "pinned_count": "resident prefix versions pinned by running requests",
    "host_bytes": "host-memory tier bytes",
    "host_budget_bytes": "host-memory tier byte budget",
    "store_available": "1 while the prefix store answers",
}

_KV_GAUGES = {
    "bytes_used": "bytes of the KV block pool in use (rows' blocks and shared prefix blocks)",
    "bytes_total": "bytes of the KV block pool",
    "blocks_used": "KV blocks in use",
    "blocks_total": "KV blocks in the pool",
    "shared_prefix_blocks": "KV blocks holding prefixes, each prefix once for all its rows",
    "shared_prefixes": "prefixes held in the KV pool",
    "rows_sharing_prefixes": "rows reading a shared prefix",
}


class EngineGauges(Protocol):
    """What the scrape-time gauges read of the engine."""

    def counts(self) -> dict[str, int]:
        """``{"running": admitted requests, "waiting": queued requests}``."""
        ...

    @property
    def num_pinned(self) -> int:
        """Requests holding a prefix pin."""
        ...

    def stats(self) -> EngineStats:
        """Steps, prefilled tokens and the KV pool."""
        ...


class CacheStats(Protocol):
    """What the scrape-time gauges read of the prefix cache."""

    def stats(self) -> RegistryStats: ...


class ServerMetrics:
    """The metrics of one app. Build it with :func:`install_metrics`; the lifespan attaches the engine and
    the prefix cache once it has built them (until then a scrape shows the HTTP series only)."""

    def __init__(self) -> None:
        self.registry = CollectorRegistry()
        r = self.registry
        self.http_requests = Counter(
            f"{_NS}_http_requests", "HTTP requests", ["method", "route", "status"], registry=r
        )
        self.http_latency = Histogram(
            f"{_NS}_http_request_duration_seconds",
            "HTTP request latency, to the last byte of the response",
            ["method", "route", "status"],
            buckets=_LATENCY_BUCKETS,
            registry=r,
        )
        self.tenant_requests = Counter(
            f"{_NS}_tenant_requests",
            "HTTP requests per tenant, of the routes that identify the caller "
            "(with auth off every caller is the tenant 'default')",
            ["tenant"],
            registry=r,
        )
        self.ttft = Histogram(
            f"{_NS}_time_to_first_token_seconds",
            "from submitting a generation request to its first token (prefix load and queueing included)",
            buckets=_TTFT_BUCKETS,
            registry=r,
        )
        self.finished_requests = Counter(
            f"{_NS}_generation_finished",
            "generation requests that left the engine, by finish reason",
            ["reason"],
            registry=r,
        )
        self.prompt_tokens = Counter(
            f"{_NS}_prompt_tokens", "prompt tokens of the requests that left the engine", registry=r
        )
        self.generated_tokens = Counter(f"{_NS}_generated_tokens", "tokens generated", registry=r)
        self.tenant_tokens = Counter(
            f"{_NS}_tenant_tokens",
            "tokens per tenant, by kind (prompt, completion)",
            ["tenant", "kind"],
            registry=r,
        )
        self._scraped = _ScrapeTimeCollector()
        r.register(self._scraped)
        ProcessCollector(registry=r)

    def attach(self, engine: EngineGauges, cache: CacheStats) -> None:
        """Read ``engine``'s and ``cache``'s gauges at every scrape from now on."""
        self._scraped.sources = (engine, cache)

    def observe_http(self, method: str, route: str, status: int, seconds: float, tenant: str | None) -> None:
        labels = (method if method in _METHODS else "other", route, str(status))
        self.http_requests.labels(*labels).inc()
        self.http_latency.labels(*labels).observe(seconds)
        if tenant is not None:
            self.tenant_requests.labels(tenant).inc()

    def observer(self, tenant: str) -> Callable[[RequestOutput], None]:
        """A callback for every output of one request, as the engine delivers it (from the engine's
        thread): records its time to first token from now, its tokens, and how it ended. Make it just
        before submitting the request."""
        started = time.monotonic()
        completion_tokens = self.tenant_tokens.labels(tenant, "completion")
        first = True

        def observe(output: RequestOutput) -> None:
            nonlocal first
            if output.token_ids:
                if first:
                    self.ttft.observe(time.monotonic() - started)
                    first = False
                self.generated_tokens.inc(len(output.token_ids))
                completion_tokens.inc(len(output.token_ids))
            if output.finish_reason is not None:
                self.finished_requests.labels(output.finish_reason.value).inc()
                self.prompt_tokens.inc(output.prompt_tokens)
                self.tenant_tokens.labels(tenant, "prompt").inc(output.prompt_tokens)

        return observe

    def exposition(self) -> bytes:
        return generate_latest(_WithoutCreated(self.registry))


class _WithoutCreated:
    """``registry``'s metrics less their ``*_created`` samples."""

    def __init__(self, registry: CollectorRegistry) -> None:
        self._registry = registry

    def collect(self) -> Iterator[Metric]:
        for metric in self._registry.collect():  # fresh objects on every collect: safe to edit
            created = f"{metric.name}_created"
            metric.samples = [sample for sample in metric.samples if sample.name != created]
            yield metric


class _ScrapeTimeCollector:
    """Gauges and counters owned by other components, read when Prometheus scrapes."""

    def __init__(self) -> None:
        self.sources: tuple[EngineGauges, CacheStats] | None = None

    def collect(self) -> Iterator[Metric]:
        if self.sources is None:
            return
        engine, cache = self.sources
        counts = engine.counts()
        yield GaugeMetricFamily(f"{_NS}_queue_depth", "requests waiting to run", value=counts["waiting"])
        yield GaugeMetricFamily(
            f"{_NS}_running_requests",
            "requests admitted to the batch (prefilling or decoding)",
            value=counts["running"],
        )
        yield GaugeMetricFamily(
            f"{_NS}_pinned_requests", "requests holding a prefix pin", value=engine.num_pinned
        )
        yield from _engine_metrics(engine.stats())
        yield from _cache_metrics(cache.stats())


def _engine_metrics(stats: EngineStats) -> Iterator[Metric]:
    """Engine steps, prefilled tokens (their ratio is the prefill tokens per step) and the KV pool."""
    yield CounterMetricFamily(
        f"{_NS}_engine_steps", "engine steps (one decode pass and prefill chunks)", value=stats.steps
    )
    yield CounterMetricFamily(f"{_NS}_prefill_tokens", "prompt tokens prefilled", value=stats.prefill_tokens)
    for field, documentation in _KV_GAUGES.items():
        yield GaugeMetricFamily(f"{_NS}_kv_{field}", documentation, value=float(getattr(stats.kv, field)))
    cache = stats.prompt_cache
    for name, documentation, value in (
        ("queried_tokens", "prompt tokens of requests that looked their blocks up", cache.queried_tokens),
        ("hit_tokens", "prompt tokens found cached (not computed)", cache.hit_tokens),
        ("evictions", "cached KV blocks taken back to make room", stats.kv.evictions),
    ):
        yield CounterMetricFamily(f"{_NS}_prompt_cache_{name}", documentation, value=value)
    yield GaugeMetricFamily(
        f"{_NS}_prompt_cache_blocks",
        "KV blocks kept for later hits (no request holds them)",
        value=stats.kv.cached_blocks,
    )


def _cache_metrics(stats: RegistryStats) -> Iterator[Metric]:
    """The prefix cache's counters and gauges (``store_available``, a bool, exports as 0/1)."""
    for field, documentation in _CACHE_COUNTERS.items():
        yield CounterMetricFamily(f"{_NS}_prefix_cache_{field}", documentation, value=getattr(stats, field))
    for field, documentation in _CACHE_GAUGES.items():
        yield GaugeMetricFamily(
            f"{_NS}_prefix_cache_{field}", documentation, value=float(getattr(stats, field))
        )
    yield SummaryMetricFamily(
        f"{_NS}_prefix_load_seconds",
        "prefix loads (store or host tier to device)",
        count_value=stats.load_latency.count,
        sum_value=stats.load_latency.total_s,
    )


class HttpMetricsMiddleware:
    """Counts each HTTP request and times it to the last byte of its response (streams included)."""

    def __init__(self, app: ASGIApp, metrics: ServerMetrics) -> None:
        self.app, self.metrics = app, metrics

    async def __call__(self, scope: Scope, receive: Receive, send: Send) -> None:
        if scope["type"] != "http":
            await self.app(scope, receive, send)
            return
        started = time.perf_counter()
        status = 500  # what the client gets if the app raises before answering

        async def send_and_see(message: Message) -> None:
            nonlocal status
            if message["type"] == "http.response.start":
                status = message["status"]
            await send(message)

        try:
            await self.app(scope, receive, send_and_see)
        finally:
            tenant = scope.get("state", {}).get("tenant")  # set by authentication, if the route has it
            self.metrics.observe_http(
                scope["method"],
                route_label(scope),
                status,
                time.perf_counter() - started,
                tenant if isinstance(tenant, str) else None,
            )


def route_label(scope: Scope) -> str:
    """The template of the route that answered (``/v1/admin/prefixes/{task_id}``), once routing is done.

    FastAPI's routes leave themselves on the scope; the others (``/openapi.json``, the docs' static
    files) leave only their endpoint, which names them among the app's routes."""
    route = scope.get("route")
    endpoint = scope.get("endpoint")
    if route is None and endpoint is not None and "app" in scope:
        for candidate in scope["app"].routes:
            if endpoint in (getattr(candidate, "endpoint", None), getattr(candidate, "app", None)):
                route = candidate
                break
    return getattr(route, "path", _UNMATCHED)


router = APIRouter(tags=["health"])


@router.get("/metrics", include_in_schema=False)
async def metrics_endpoint(request: Request) -> Response:
    """Prometheus text format (no auth)."""
    metrics: ServerMetrics = request.app.state.metrics
    return Response(metrics.exposition(), media_type=CONTENT_TYPE_PLAIN_0_0_4)


def install_metrics(app: FastAPI) -> ServerMetrics:
    """Give ``app`` its own metrics: the HTTP middleware, ``GET /metrics`` and ``app.state.metrics``."""
    metrics = ServerMetrics()
    app.state.metrics = metrics
    app.add_middleware(HttpMetricsMiddleware, metrics=metrics)
    app.include_router(router)
    return metrics
