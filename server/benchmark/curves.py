"""Scaling curves: each point is a closed-loop run (median of ``repeats``, points interleaved) with its
throughput and latency, and its throughput relative to the curve's reference point (run around it).

  concurrency    the engine, the baselines' task mix, 1-64 clients (batch size = clients)
  prefix-length  the engine, every request on one prefix of 0-128 virtual tokens; relative to none
  tasks          the in-process server (registry + async engine), 1-512 tasks all resident, each
                 request on a task drawn at random; relative to 8 tasks
  cache-budget   the in-process server, a working set of ``cache_tasks`` tasks 0.5x-4x the registry's
                 budget, tasks drawn at random (misses load from the filesystem store while the engine
                 runs); relative to the smallest working set; with the hit rate
"""

from __future__ import annotations

import asyncio
import statistics
from collections import defaultdict
from collections.abc import Callable, Sequence
from dataclasses import replace
from pathlib import Path
from typing import Any

from server.benchmark.baselines import Log, mix_lengths
from server.benchmark.loops import EngineSystem, closed_loop
from server.benchmark.models import random_prefixes, random_tasks
from server.benchmark.served import InProcessServer, upload
from server.benchmark.served import closed_loop as async_closed_loop
from server.benchmark.settings import BenchSettings
from server.benchmark.timeline import Timeline, summarize
from server.benchmark.workload import engine_requests, http_bodies, sample_shapes, single_token_words
from server.engine.base_model import BaseModel

Point = dict[str, Any]


def _curve(
    xs: Sequence[float],
    run: Callable[[float], Timeline],
    settings: BenchSettings,
    name: str,
    log: Log,
    *,
    warm_up: float | None,
    reference: float | None = None,
) -> list[Point]:
    """Each x's ``summarize`` over ``repeats`` rounds of the points, after one unrecorded run at
    ``warm_up`` (allocations, first-call costs).

    With a ``reference`` x, each round runs every other x between two runs of the reference, and an
    x's ``relative`` is the median over rounds of its throughput over the mean of the two reference
    runs around it: the machine's drift cancels within each bracket of three short runs."""
    if warm_up is not None:
        run(warm_up)
    runs: dict[float, list[Timeline]] = defaultdict(list)
    ratios: dict[float, list[float]] = defaultdict(list)

    def measure(x: float, repeat: int) -> float:
        runs[x].append(run(x))
        log(f"{name} {repeat + 1}/{settings.repeats}: {x} -> {runs[x][-1].tokens_per_s:.1f} tok/s")
        return runs[x][-1].tokens_per_s

    for repeat in range(settings.repeats):
        if reference is None:
            for x in xs:
                measure(x, repeat)
            continue
        before = measure(reference, repeat)
        for x in (x for x in xs if x != reference):
            value, after = measure(x, repeat), measure(reference, repeat)
            ratios[x].append(value / statistics.mean([before, after]))
            before = after
    points = [{"x": x, **summarize(runs[x])} for x in xs]
    if reference is not None:
        for point in points:
            point["relative"] = statistics.median(ratios[point["x"]]) if point["x"] != reference else 1.0
    return points


def concurrency_curve(base: BaseModel, settings: BenchSettings, log: Log) -> list[Point]:
    prefixes = random_tasks(base, mix_lengths(settings.tasks), seed=11)
    vocab = base.model.config.vocab_size

    def run(clients: float) -> Timeline:
        clients = int(clients)
        shapes = sample_shapes(settings.workload.for_clients(clients), sorted(prefixes))
        requests = engine_requests(shapes, prefixes, vocab_size=vocab)
        return closed_loop(EngineSystem(base, max_batch_size=clients), requests, clients)

    return _curve(settings.concurrency_curve, run, settings, "concurrency", log, warm_up=settings.concurrency)


def prefix_length_curve(base: BaseModel, settings: BenchSettings, log: Log) -> list[Point]:
    vocab = base.model.config.vocab_size
    shapes = sample_shapes(settings.workload, ["task"])
    lengths = [length for length in settings.prefix_curve if length > 0]
    prefix_of = dict(zip(lengths, random_prefixes(base, lengths, seed=13), strict=True))

    def run(length: float) -> Timeline:
        if length:
            requests = engine_requests(shapes, {"task": prefix_of[int(length)]}, vocab_size=vocab)
        else:
            requests = engine_requests([replace(s, task_id=None) for s in shapes], {}, vocab_size=vocab)
        return closed_loop(
            EngineSystem(base, max_batch_size=settings.concurrency), requests, settings.concurrency
        )

    return _curve(
        settings.prefix_curve,
        run,
        settings,
        "prefix-length",
        log,
        warm_up=min(settings.prefix_curve),
        reference=0,
    )


def tasks_curve(base: BaseModel, settings: BenchSettings, workdir: Path, log: Log) -> list[Point]:
    prefixes = random_tasks(base, [settings.curve_prefix_tokens] * max(settings.tasks_curve), seed=17)
    names = list(prefixes)
    store_url = (workdir / "tasks-store").as_uri()
    upload(store_url, base, prefixes)
    words = single_token_words(base.tokenizer)

    def run(tasks: float) -> Timeline:
        chosen = names[: int(tasks)]
        bodies = http_bodies(sample_shapes(settings.workload, chosen, random_tasks=True), words)
        return asyncio.run(_serve(base, store_url, bodies, settings.concurrency, preload=chosen))

    return _curve(
        settings.tasks_curve, run, settings, "tasks", log, warm_up=min(settings.tasks_curve), reference=8
    )


def cache_budget_curve(base: BaseModel, settings: BenchSettings, workdir: Path, log: Log) -> list[Point]:
    prefixes = random_tasks(base, [settings.curve_prefix_tokens] * settings.cache_tasks, seed=19)
    names = list(prefixes)
    store_url = (workdir / "cache-store").as_uri()
    upload(store_url, base, prefixes)
    prefix_bytes = settings.curve_prefix_tokens * base.geometry.bytes_per_virtual_token(base.dtype.itemsize)
    working_set = prefix_bytes * len(names)
    spec = replace(settings.workload, requests=max(settings.workload.requests, 2 * len(names)))
    bodies = http_bodies(sample_shapes(spec, names, random_tasks=True), single_token_words(base.tokenizer))
    hit_rates: dict[float, list[float]] = defaultdict(list)

    def run(ratio: float) -> Timeline:
        budget = max(int(working_set / ratio), prefix_bytes * settings.concurrency)  # room for every pin
        return asyncio.run(
            _serve(
                base,
                store_url,
                bodies,
                settings.concurrency,
                budget_bytes=budget,
                preload=names,
                hit_rates=hit_rates[ratio],
            )
        )

    points = _curve(
        settings.cache_curve,
        run,
        settings,
        "cache-budget",
        log,
        warm_up=None,
        reference=min(settings.cache_curve),
    )
    for point in points:  # of acquires during the runs (after a warm preload); the mean of the repeats
        point["hit_rate"] = statistics.mean(hit_rates[point["x"]])
    return points


async def _serve(
    base: BaseModel,
    store_url: str,
    bodies: list[dict],
    concurrency: int,
    *,
    preload: Sequence[str] = (),
    budget_bytes: int | None = None,
    hit_rates: list[float] | None = None,
) -> Timeline:
    async with InProcessServer(
        base, store_url, max_batch_size=concurrency, budget_bytes=budget_bytes, preload=preload
    ) as server:
        before = server.registry.stats()  # after the preload: the run starts warm
        timeline = await async_closed_loop(server.send, bodies, concurrency)
        after = server.registry.stats()
        if hit_rates is not None:
            hits = after.hits - before.hits
            hit_rates.append(
                hits / max(hits + after.misses - before.misses + after.coalesced - before.coalesced, 1)
            )
    return timeline
