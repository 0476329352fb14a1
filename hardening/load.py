"""Overload with hot swaps: twice the server's admission capacity for a sustained period, the served
prefix replaced every second. Loopback only; bounded in time and in requests.

    python -m hardening.load --seconds 60 --out hardening/results/load.json

The server runs ``--max-batch-size B`` and ``--max-queue Q``; ``2 (B + Q)`` closed-loop clients (a quarter
streaming) generate with one task while an uploader replaces its prefix every second, cycling three
different prefixes. A run passes with:

- zero 5xx and zero failed admitted requests (every answer other than 429 is a complete 200);
- overload shed quickly: p99 latency of the 429 answers under 50 ms, as a probe in its own process
  sees them (one request every 20 ms; the load clients' own figure is reported beside it);
- no request seeing a mix of versions: every greedy output is the one its version and prompt give;
- every swap acknowledged, and RSS stable: after a warm-up, the last tenth of the run's RSS samples
  within 5% of the first tenth's.
"""

from __future__ import annotations

import argparse
import asyncio
import gc
import json
import random
import statistics
import subprocess
import sys
import threading
import time
from collections import Counter, defaultdict
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import httpx

from hardening.common import hardening_server, write_result
from hardening.prefixes import model_geometry, native_prefix, upload
from testing.server_process import ServerProcess

TASK = "swapped"
PROMPTS = ["Once upon a time", "The weather today", "In the beginning", "A short story about"]
NEW_TOKENS = 16


@dataclass
class LoadStats:
    ok_latency: list[float] = field(default_factory=list)
    shed_latency: list[float] = field(default_factory=list)
    statuses: Counter[int] = field(default_factory=Counter)
    failures: list[str] = field(default_factory=list)  # admitted requests that did not complete
    outputs: dict[tuple[str, str], set[tuple[int, ...]]] = field(default_factory=lambda: defaultdict(set))
    swaps: int = 0
    swap_failures: list[str] = field(default_factory=list)
    rss: list[tuple[float, int]] = field(default_factory=list)
    probe: dict[int, list[float]] = field(default_factory=lambda: defaultdict(list))  # status -> latencies


def _percentile(values: list[float], q: float) -> float:
    if not values:
        return 0.0
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))]


async def _client(
    client: httpx.AsyncClient, i: int, stats: LoadStats, deadline: float, budget: list[int]
) -> None:
    rng = random.Random(i)
    streaming = i % 4 == 3
    while time.monotonic() < deadline and budget[0] > 0:
        budget[0] -= 1
        prompt = rng.choice(PROMPTS)
        body = {"task_id": TASK, "prompt": prompt, "max_new_tokens": NEW_TOKENS, "stream": streaming}
        started = time.perf_counter()
        try:
            status, version, tokens, problem = await (
                _stream(client, body) if streaming else _plain(client, body)
            )
        except httpx.TransportError as exc:
            status, version, tokens, problem = 0, None, (), f"transport error: {exc!r}"
        elapsed = time.perf_counter() - started
        stats.statuses[status] += 1
        if status == 429:
            stats.shed_latency.append(elapsed)
            await asyncio.sleep(rng.uniform(0.05, 0.15))  # a client that backs off a little, not a spin
        elif problem is None and status == 200 and version is not None:
            stats.ok_latency.append(elapsed)
            stats.outputs[(version.split("-", 1)[1], prompt)].add(tokens)
        else:
            stats.failures.append(problem or f"status {status}")


async def _plain(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[int, str | None, tuple[int, ...], str | None]:
    response = await client.post("/v1/generate", json=body)
    if response.status_code != 200:
        return response.status_code, None, (), None if response.status_code == 429 else response.text[:200]
    data = response.json()
    done = data["finish_reason"] in ("length", "eos", "stop")
    return (
        200,
        data["prefix_version"],
        tuple(data["token_ids"]),
        None if done else f"finished {data['finish_reason']}",
    )


async def _stream(
    client: httpx.AsyncClient, body: dict[str, Any]
) -> tuple[int, str | None, tuple[int, ...], str | None]:
    async with client.stream("POST", "/v1/generate", json=body) as response:
        if response.status_code != 200:
            text = (await response.aread()).decode(errors="replace")
            return response.status_code, None, (), None if response.status_code == 429 else text[:200]
        tokens: list[int] = []
        final: dict[str, Any] | None = None
        done = False
        async for line in response.aiter_lines():
            if not line.startswith("data: "):
                continue
            if line == "data: [DONE]":
                done = True
                break
            event = json.loads(line[6:])
            if "token_id" in event:
                tokens.append(event["token_id"])
            else:
                final = event
    if not done or final is None:
        return 200, None, (), "the stream ended without its final event and [DONE]"
    return 200, final["prefix_version"], tuple(tokens), None


def _swapper(server: ServerProcess, key: str | None, stats: LoadStats, stop: threading.Event) -> None:
    """Replace the task's prefix every second, cycling three different prefixes."""
    geometry = model_geometry(server.model_dir)
    blobs = [native_prefix(geometry, 4, seed=i) for i in range(3)]
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=server.url, headers=headers, timeout=30) as client:
        while not stop.wait(1.0):
            response = upload(client, TASK, blobs[stats.swaps % 3])
            stats.swaps += 1
            if response.status_code not in (200, 201):
                stats.swap_failures.append(f"{response.status_code}: {response.text[:200]}")


def _sampler(server: ServerProcess, stats: LoadStats, stop: threading.Event, started: float) -> None:
    while not stop.wait(1.0):
        stats.rss.append((time.perf_counter() - started, server.rss_bytes()))


async def _drive(
    server: ServerProcess, key: str | None, clients: int, seconds: float, max_requests: int, stats: LoadStats
) -> None:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    limits = httpx.Limits(max_connections=clients, max_keepalive_connections=clients)
    deadline = time.monotonic() + seconds
    budget = [max_requests]
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=60, limits=limits) as client:
        await asyncio.gather(*(_client(client, i, stats, deadline, budget) for i in range(clients)))


def run(
    server: ServerProcess, key: str | None, *, seconds: float, max_requests: int, warmup_s: float
) -> dict[str, Any]:
    """Drive ``server`` (configured with max_batch_size and max_queue in its env) and report."""
    batch = int(server.env["PREFIX_SERVE_MAX_BATCH_SIZE"])
    queue = int(server.env["PREFIX_SERVE_MAX_QUEUE"])
    clients = 2 * (batch + queue)
    with httpx.Client(
        base_url=server.url, headers={"Authorization": f"Bearer {key}"} if key else {}
    ) as client:
        assert upload(client, TASK, native_prefix(model_geometry(server.model_dir), 4, seed=0)).is_success
    stats = LoadStats()
    stop = threading.Event()
    gc.collect()
    gc.freeze()  # this process imported torch too: its full collections would stall the clients' clock
    started = time.perf_counter()
    helpers = [
        threading.Thread(target=_swapper, args=(server, key, stats, stop)),
        threading.Thread(target=_sampler, args=(server, stats, stop, started)),
    ]
    for thread in helpers:
        thread.start()
    probe = subprocess.Popen(
        [
            sys.executable,
            "-m",
            "hardening.probe",
            server.url,
            str(key),
            "--task",
            TASK,
            "--seconds",
            str(seconds),
        ],
        stdout=subprocess.PIPE,
        text=True,
    )
    try:
        asyncio.run(_drive(server, key, clients, seconds, max_requests, stats))
    finally:
        stop.set()
        for thread in helpers:
            thread.join()
        probed, _ = probe.communicate(timeout=120)
    for status, latency in json.loads(probed):
        stats.probe[status].append(latency)
    elapsed = time.perf_counter() - started
    result = summarise(stats, clients=clients, batch=batch, queue=queue, elapsed=elapsed, warmup_s=warmup_s)
    labels = {"method": "POST", "route": "/v1/generate", "status": "429"}
    bucket = "prefix_serve_http_request_duration_seconds_bucket"
    timed = server.counter(bucket, le="+Inf", **labels)
    within = server.counter(bucket, le="0.05", **labels)
    result["server_timed_429_within_50ms_pct"] = round(100 * within / timed, 2) if timed else None
    return result


def summarise(
    stats: LoadStats, *, clients: int, batch: int, queue: int, elapsed: float, warmup_s: float
) -> dict[str, Any]:
    mixed = {f"{sha}/{prompt}": len(outs) for (sha, prompt), outs in stats.outputs.items() if len(outs) > 1}
    samples = [rss for at, rss in stats.rss if at >= warmup_s]
    tenth = max(1, len(samples) // 10)
    first, last = statistics.mean(samples[:tenth] or [0]), statistics.mean(samples[-tenth:] or [0])
    drift = (last - first) / first if first else 0.0
    server_errors = sum(n for status, n in stats.statuses.items() if status >= 500)
    probe_shed = stats.probe.get(429, [])
    shed_p99_ms = 1000 * _percentile(probe_shed, 0.99)
    probe_errors = sum(len(v) for status, v in stats.probe.items() if status not in (200, 429))
    result = {
        "clients": clients,
        "max_batch_size": batch,
        "max_queue": queue,
        "seconds": round(elapsed, 1),
        "requests": sum(stats.statuses.values()),
        "statuses": {str(k): v for k, v in sorted(stats.statuses.items())},
        "completed_per_s": round(len(stats.ok_latency) / elapsed, 1),
        "server_errors": server_errors,
        "failed_admitted": len(stats.failures),
        "failures": stats.failures[:20],
        "ok_p50_ms": round(1000 * _percentile(stats.ok_latency, 0.5), 1),
        "ok_p99_ms": round(1000 * _percentile(stats.ok_latency, 0.99), 1),
        "shed_429": len(stats.shed_latency),
        "shed_p50_ms": round(1000 * _percentile(probe_shed, 0.5), 1),
        "shed_p99_ms": round(shed_p99_ms, 1),
        "shed_probe_samples": len(probe_shed),
        "probe_statuses": {str(k): len(v) for k, v in sorted(stats.probe.items())},
        "shed_p99_ms_in_load_clients": round(1000 * _percentile(stats.shed_latency, 0.99), 1),
        "swaps": stats.swaps,
        "swap_failures": stats.swap_failures,
        "versions_seen": len({sha for sha, _ in stats.outputs}),
        "mixed_outputs": mixed,
        "rss_after_warmup_mib": [round(first / 2**20, 1), round(last / 2**20, 1)],
        "rss_drift_pct": round(100 * drift, 2),
    }
    result["passed"] = (
        server_errors == 0
        and not stats.failures
        and not stats.swap_failures
        and not mixed
        and stats.swaps > 0
        and len(probe_shed) > 0
        and probe_errors == 0
        and shed_p99_ms < 50
        and abs(drift) <= 0.05
    )
    return result


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--max-requests", type=int, default=200_000, help="a bound on the requests sent")
    parser.add_argument("--batch", type=int, default=8, help="the server's --max-batch-size")
    parser.add_argument("--queue", type=int, default=8, help="the server's --max-queue")
    parser.add_argument("--warmup", type=float, default=10.0, help="seconds of RSS samples left out")
    parser.add_argument("--out", type=Path, default=Path("hardening/results/load.json"))
    args = parser.parse_args()
    settings = {
        "PREFIX_SERVE_MAX_BATCH_SIZE": str(args.batch),
        "PREFIX_SERVE_MAX_QUEUE": str(args.queue),
        "PREFIX_SERVE_MAX_NEW_TOKENS": str(NEW_TOKENS),
    }
    with hardening_server(settings) as (server, keys, _):
        result = run(
            server, keys["admin"], seconds=args.seconds, max_requests=args.max_requests, warmup_s=args.warmup
        )
    print(
        f"{result['clients']} clients for {result['seconds']} s against batch {args.batch} + queue {args.queue}: "
        f"{result['requests']} requests {result['statuses']}; {result['server_errors']} 5xx, "
        f"{result['failed_admitted']} failed admitted; 429 p99 {result['shed_p99_ms']} ms; "
        f"{result['swaps']} swaps, {len(result['mixed_outputs'])} mixed outputs; "
        f"RSS drift {result['rss_drift_pct']}%; passed: {result['passed']}"
    )
    write_result(args.out, result)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
