"""What the prefix store costs the registry, measured against plain baselines in the same run:

load     ``PrefixRegistry.acquire`` of a version that is not resident (a registry whose budget holds
         one prefix, cycling over 16 tasks: every acquire a miss) — record read, blob read,
         validation, decode, cast, placement — against a raw read of the same bytes (the blob file
         from the page cache; one Redis ``GET`` on the same client), with its parts timed alone
thrash   acquire + release per second with the working set twice the budget (every acquire a miss)
         against all resident (every acquire a hit), one thread
"""

from __future__ import annotations

import statistics
import time
from collections.abc import Callable
from typing import Any

import torch

from prefix_store.cache.loading import fetch_prefix, place_prefix
from prefix_store.cache.registry import PrefixRegistry
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import encode_native
from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from prefix_store.storage.store import PrefixStore, open_store

TENANT = "bench"
NUM_VIRTUAL_TOKENS = 20


def prefix_blobs(geometry: ModelGeometry, dtype: torch.dtype, count: int) -> list[bytes]:
    """``count`` random native prefixes of ``NUM_VIRTUAL_TOKENS`` tokens."""
    generator = torch.Generator().manual_seed(0)
    shape = geometry.prefix_shape(NUM_VIRTUAL_TOKENS)  # [L, H, P, D]
    return [
        encode_native(
            Prefix(
                torch.randn(shape, generator=generator).to(dtype),
                torch.randn(shape, generator=generator).to(dtype),
            ),
            geometry,
        )
        for _ in range(count)
    ]


def summary_ms(samples: list[float]) -> dict[str, float]:
    ordered = sorted(samples)

    def at(q: float) -> float:
        return ordered[min(len(ordered) - 1, round(q / 100 * (len(ordered) - 1)))] * 1e3

    return {"p50_ms": at(50), "p99_ms": at(99), "mean_ms": statistics.fmean(samples) * 1e3, "n": len(samples)}


def sync(device: torch.device) -> None:
    if device.type == "cuda":
        torch.cuda.synchronize(device)


def registry_for(
    store: PrefixStore,
    geometry: ModelGeometry,
    dtype: torch.dtype,
    device: torch.device,
    budget_prefixes: int,
    **options: Any,
) -> PrefixRegistry:
    """A registry whose budget holds ``budget_prefixes`` prefixes of ``NUM_VIRTUAL_TOKENS`` tokens."""
    prefix_bytes = NUM_VIRTUAL_TOKENS * geometry.bytes_per_virtual_token(dtype.itemsize)
    return PrefixRegistry(
        store,
        geometry,
        device=device,
        dtype=dtype,
        limits=PrefixLimits(),
        budget_bytes=budget_prefixes * prefix_bytes,
        **options,
    )


def raw_reader(store: PrefixStore) -> Callable[[str], bytes]:
    """Read a blob the plainest way the backend allows, bypassing the store's code."""
    if hasattr(store, "root"):
        root = store.root  # type: ignore[attr-defined]
        return lambda sha: (root / "blobs" / sha[:2] / f"{sha}.safetensors").read_bytes()
    client, namespace = store._redis, store.namespace  # type: ignore[attr-defined]
    return lambda sha: client.get(f"{namespace}:blob:{sha}")


def measure_load(
    store: PrefixStore,
    geometry: ModelGeometry,
    dtype: torch.dtype,
    device: torch.device,
    blobs: list[bytes],
    samples: int,
) -> dict[str, Any]:
    """Load on a miss vs raw read (p50/p99 ms and their ratios), and the load's parts."""
    tasks = [f"load-{i}" for i in range(16)]
    records = [
        store.put(
            TENANT, t, blobs[i % len(blobs)], num_virtual_tokens=NUM_VIRTUAL_TOKENS, source_format="native"
        )[0]
        for i, t in enumerate(tasks)
    ]
    read_raw = raw_reader(store)
    parts: dict[str, list[float]] = {
        k: [] for k in ("acquire", "raw_read", "head", "get_blob", "decode_cast", "place")
    }
    options = {"prefetch_on_change": False, "reconcile_interval_s": None}
    with registry_for(store, geometry, dtype, device, budget_prefixes=1, **options) as registry:
        for i in range(samples + 10):  # the first 10 warm up
            task, record = tasks[i % len(tasks)], records[i % len(tasks)]
            started = time.perf_counter()
            read_raw(record.sha256)
            raw = time.perf_counter() - started
            started = time.perf_counter()
            handle = registry.acquire(TENANT, task)
            sync(device)
            acquire = time.perf_counter() - started
            registry.release(handle)
            # the parts, measured on their own right after
            t0 = time.perf_counter()
            store.head(TENANT, task)
            t1 = time.perf_counter()
            store.get_blob(record)
            t2 = time.perf_counter()
            cpu = fetch_prefix(store, record, geometry, PrefixLimits(), dtype)
            t3 = time.perf_counter()
            place_prefix(cpu, device)
            sync(device)
            t4 = time.perf_counter()
            if i >= 10:
                for name, value in (
                    ("acquire", acquire),
                    ("raw_read", raw),
                    ("head", t1 - t0),
                    ("get_blob", t2 - t1),
                    ("decode_cast", (t3 - t2) - (t2 - t1)),
                    ("place", t4 - t3),
                ):
                    parts[name].append(value)
        stats = registry.stats()
        assert stats.misses == samples + 10 and stats.hits == 0, stats
    result: dict[str, Any] = {name: summary_ms(values) for name, values in parts.items()}
    result["ratio_p50"] = result["acquire"]["p50_ms"] / result["raw_read"]["p50_ms"]
    result["ratio_p99"] = result["acquire"]["p99_ms"] / result["raw_read"]["p99_ms"]
    return result


def measure_thrash(
    store: PrefixStore,
    geometry: ModelGeometry,
    dtype: torch.dtype,
    device: torch.device,
    blobs: list[bytes],
    rounds: int,
) -> dict[str, Any]:
    """Acquisitions per second, all resident vs a working set of twice the budget."""
    budget = 8
    tasks = [f"thrash-{i}" for i in range(2 * budget)]
    for i, task in enumerate(tasks):
        store.put(
            TENANT, task, blobs[i % len(blobs)], num_virtual_tokens=NUM_VIRTUAL_TOKENS, source_format="native"
        )
    result: dict[str, Any] = {}
    for name, working_set in (("all_resident", tasks[:budget]), ("working_set_2x_budget", tasks)):
        with registry_for(
            store, geometry, dtype, device, budget_prefixes=budget, reconcile_interval_s=None
        ) as registry:
            for task in working_set:
                registry.release(registry.acquire(TENANT, task))
            count = rounds * len(tasks)
            started = time.perf_counter()
            for i in range(count):
                registry.release(registry.acquire(TENANT, working_set[i % len(working_set)]))
            sync(device)
            elapsed = time.perf_counter() - started
            stats = registry.stats()
            result[name] = {"acquires_per_s": count / elapsed, "hits": stats.hits, "misses": stats.misses}
    result["slowdown"] = (
        result["all_resident"]["acquires_per_s"] / result["working_set_2x_budget"]["acquires_per_s"]
    )
    return result


def measure_stores(
    urls: dict[str, str],
    geometry: ModelGeometry,
    dtype: torch.dtype,
    device: torch.device,
    *,
    samples: int,
    rounds: int,
) -> dict[str, dict[str, Any]]:
    """``measure_load`` and ``measure_thrash`` on each backend (name -> store URL)."""
    blobs = prefix_blobs(geometry, dtype, 8)
    results = {}
    for backend, url in urls.items():
        with open_store(url) as store:
            results[backend] = {
                "prefix_bytes": len(blobs[0]),
                "load": measure_load(store, geometry, dtype, device, blobs, samples),
                "thrash": measure_thrash(store, geometry, dtype, device, blobs, rounds),
            }
    return results
