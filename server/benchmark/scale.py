"""Thousands of tasks per tenant (the ``scale`` section), each ratio measured in the same run.

uploads    ``tasks`` uploads into one tenant through the store's put with the tenant's quota (what the
           admin route runs after validating), timed a ``batch`` at a time: the rate of the last batch
           over the first, on the filesystem store (and Redis with ``--redis-url``)
listing    one page (100) of a tenant of ``tasks`` against one page of a tenant of 100
traffic    requests over all ``tasks`` tasks drawn by Zipf(1.0), the registry's budget holding a tenth of
           them (misses load from the store while the engine runs), against 8 resident tasks
start-up   the server (a process) ready on a store of ``startup_tasks`` tasks over several tenants,
           against an empty store
"""

from __future__ import annotations

import asyncio
import random
import statistics
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import torch

from prefix_store.formats.native import encode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from prefix_store.storage.store import PrefixStore, Quota, open_store
from server.benchmark.baselines import Log
from server.benchmark.served import InProcessServer, save_model
from server.benchmark.served import closed_loop as async_closed_loop
from server.benchmark.settings import BenchSettings, ScaleSpec
from server.benchmark.timeline import Timeline, paired_ratio
from server.benchmark.workload import single_token_words
from server.engine.base_model import BaseModel
from server.engine.config import DEFAULT_TENANT
from testing.server_process import ServerProcess


@dataclass(frozen=True)
class _Blobs:
    """Distinct valid native prefixes of ``geometry``, made cheaply: zeros, the first value changed per
    task (every blob is another content, as real tasks are)."""

    geometry: ModelGeometry
    tokens: int

    def __call__(self, i: int) -> bytes:
        shape = self.geometry.prefix_shape(self.tokens)
        keys = torch.zeros(shape)
        keys.view(-1)[0] = float(i % 65536) / 65536
        return encode_native(Prefix(keys, torch.zeros(shape)), self.geometry)


# the start-up store's tasks: the server reads none of them at start, so their size does not matter
_SMALL_GEOMETRY = ModelGeometry(model_type="llama", num_layers=1, num_kv_heads=1, head_dim=4)


def _fill(
    store: PrefixStore, tenant: str, count: int, blob: Callable[[int], bytes], tokens: int, batch: int = 1000
) -> list[float]:
    """Upload ``count`` tasks into ``tenant`` with a quota (checked on every upload); the seconds each
    ``batch`` of uploads took."""
    quota = Quota(max_prefixes=count, max_bytes=1 << 40)
    batches, started = [], time.perf_counter()
    for i in range(count):
        store.put(
            tenant, f"task-{i:06d}", blob(i), num_virtual_tokens=tokens, source_format="native", quota=quota
        )
        if (i + 1) % batch == 0 or i + 1 == count:
            now = time.perf_counter()
            batches.append(now - started)
            started = now
    return batches


def measure_uploads(urls: dict[str, str], spec: ScaleSpec, blob: _Blobs, log: Log) -> dict[str, Any]:
    """Per backend: the seconds of each batch of uploads and the last batch's rate over the first's."""
    result: dict[str, Any] = {}
    for backend, url in urls.items():
        with open_store(url) as store:
            batches = _fill(store, DEFAULT_TENANT, spec.tasks, blob, blob.tokens, spec.batch)
        result[backend] = {
            "tasks": spec.tasks,
            "batch": spec.batch,
            "batch_s": batches,
            "first_per_s": spec.batch / batches[0],
            "last_per_s": spec.batch / batches[-1],
        }
        result[backend]["last_over_first"] = result[backend]["last_per_s"] / result[backend]["first_per_s"]
        log(f"scale uploads {backend}: {result[backend]['last_over_first']:.2f} (last / first batch)")
    return result


def measure_listing(urls: dict[str, str], spec: ScaleSpec, blob: _Blobs, repeats: int) -> dict[str, Any]:
    """Per backend: the median time of one page (the first, and one from the middle) of the tenant the
    uploads filled, against one page of a tenant of 100, the two interleaved."""
    result: dict[str, Any] = {}
    for backend, url in urls.items():
        with open_store(url) as store:
            _fill(store, "small", 100, blob, blob.tokens)
            middle = f"task-{spec.tasks // 2:06d}"

            def page(tenant: str, cursor: str | None) -> float:
                started = time.perf_counter()
                store.list_page(tenant, cursor=cursor, limit=100)
                return time.perf_counter() - started

            big, small = [], []
            for _ in range(10 * repeats):
                big += [page(DEFAULT_TENANT, None), page(DEFAULT_TENANT, middle)]
                small += [page("small", None), page("small", "task-000050")]
        result[backend] = {
            "page_ms_at_tasks": statistics.median(big) * 1e3,
            "page_ms_at_100": statistics.median(small) * 1e3,
            "ratio": statistics.median(big) / statistics.median(small),
        }
    return result


def measure_traffic(base: BaseModel, settings: BenchSettings, store_url: str, log: Log) -> dict[str, Any]:
    """Requests over every task the uploads stored (the default tenant's) drawn by Zipf(1.0), the registry
    holding a tenth of them, against the same requests over 8 tasks all resident; run in pairs."""
    spec = settings.scale
    names = [f"task-{i:06d}" for i in range(spec.tasks)]
    rng = random.Random(41)
    weights = [1 / (rank + 1) for rank in range(len(names))]
    words = single_token_words(base.tokenizer)
    prefix_bytes = spec.prefix_tokens * base.geometry.bytes_per_virtual_token(base.dtype.itemsize)
    budget = max(len(names) // 10, settings.concurrency) * prefix_bytes

    def bodies(tasks: list[str]) -> list[dict]:
        return [
            {
                "prompt": " ".join(rng.choice(words) for _ in range(16)),
                "max_new_tokens": 16,
                "task_id": task,
            }
            for task in tasks
        ]

    async def serve(chosen: list[dict], budget_bytes: int | None, preload: list[str]) -> Timeline:
        async with InProcessServer(
            base,
            store_url,
            max_batch_size=settings.concurrency,
            budget_bytes=budget_bytes,
            preload=preload,
        ) as server:
            return await async_closed_loop(server.send, chosen, settings.concurrency)

    zipf, resident = [], []
    for round_ in range(settings.repeats):
        drawn = rng.choices(names, weights, k=spec.requests)
        zipf.append(asyncio.run(serve(bodies(drawn), budget, [])))
        eight = [names[i % 8] for i in range(spec.requests)]
        resident.append(asyncio.run(serve(bodies(eight), None, names[:8])))
        log(
            f"scale traffic {round_ + 1}/{settings.repeats}: Zipf over {len(names)} "
            f"{zipf[-1].tokens_per_s:.1f} tok/s, 8 resident {resident[-1].tokens_per_s:.1f} tok/s"
        )
    return {
        "tasks": len(names),
        "budget_tasks": budget // prefix_bytes,
        "zipf_tokens_per_s": statistics.median(t.tokens_per_s for t in zipf),
        "resident_tokens_per_s": statistics.median(t.tokens_per_s for t in resident),
        "ratio": paired_ratio([t.tokens_per_s for t in zipf], [t.tokens_per_s for t in resident]),
    }


def measure_startup(base: BaseModel, spec: ScaleSpec, workdir: Path, log: Log) -> dict[str, Any]:
    """The server ready (``/readyz`` 200) on a filesystem store of ``startup_tasks`` tasks over
    ``startup_tenants`` tenants, against an empty store: seconds from launch."""
    model_dir = save_model(base, workdir / "scale-model")
    full_url = (workdir / "scale-startup-store").as_uri()
    small = _Blobs(_SMALL_GEOMETRY, 1)
    per_tenant = spec.startup_tasks // spec.startup_tenants
    with open_store(full_url) as store, ThreadPoolExecutor(spec.startup_tenants) as pool:
        filled = [
            pool.submit(_fill, store, f"tenant-{t}", per_tenant, small, 1)
            for t in range(spec.startup_tenants)
        ]
        for done in filled:
            done.result()
    log(f"scale start-up: a store of {spec.startup_tasks} tasks written")
    seconds = {}
    for name, url in (("empty", (workdir / "scale-empty-store").as_uri()), ("full", full_url)):
        started = time.perf_counter()
        with ServerProcess(model_dir, url, ready_s=300):
            seconds[name] = time.perf_counter() - started
    return {
        "tasks": spec.startup_tasks,
        "tenants": spec.startup_tenants,
        "empty_s": seconds["empty"],
        "full_s": seconds["full"],
        "ratio": seconds["full"] / seconds["empty"],
    }


def scale(base: BaseModel, settings: BenchSettings, workdir: Path, log: Log) -> dict[str, Any]:
    """Every part of the section (see the module's docstring)."""
    spec = settings.scale
    blob = _Blobs(base.geometry, spec.prefix_tokens)
    urls = {"filesystem": (workdir / "scale-store").as_uri()}
    if settings.redis_url:
        urls["redis"] = settings.redis_url
    log(f"scale: {spec.tasks} uploads into one tenant on {', '.join(urls)}")
    report: dict[str, Any] = {"spec": spec.__dict__, "uploads": measure_uploads(urls, spec, blob, log)}
    report["listing"] = measure_listing(urls, spec, blob, settings.repeats)
    log(f"scale: Zipf traffic over {spec.tasks} tasks")
    report["traffic"] = measure_traffic(base, settings, urls["filesystem"], log)
    log(f"scale: start-up on a store of {spec.startup_tasks} tasks")
    report["startup"] = measure_startup(base, spec, workdir, log)
    return report
