"""Streaming clients that go away mid-stream: their batch rows, queue places and prefix pins come back.

    python -m hardening.disconnects --clients 50 --rounds 5 --out hardening/results/disconnects.json

Each round opens ``clients`` streaming generations of one prefix task at once (more than the batch
holds, so some wait in the queue) and drops each connection at a different point: right after the
response headers, or after one to three events (most are cut short; a few may meet the end of their
text first, as greedy decoding of the demo model can). Then ``GET /metrics`` must show
``prefix_serve_running_requests``, ``prefix_serve_queue_depth``, ``prefix_serve_pinned_requests`` and
``prefix_serve_prefix_cache_pinned_count`` back at zero, and a new request must be served.
"""

from __future__ import annotations

import argparse
import asyncio
import time
from pathlib import Path
from typing import Any

import httpx

from hardening.common import hardening_server, write_result
from hardening.prefixes import model_geometry, native_prefix, upload
from testing.server_process import ServerProcess

GAUGES = (
    "prefix_serve_running_requests",
    "prefix_serve_queue_depth",
    "prefix_serve_pinned_requests",
    "prefix_serve_prefix_cache_pinned_count",
)
TASK = "streamed"


async def _open_and_leave(client: httpx.AsyncClient, i: int, opened: asyncio.Barrier) -> int:
    """Stream a long generation; once every client has its response headers, leave after ``i % 4``
    events (0: at once). Returns the HTTP status."""
    body = {"task_id": TASK, "prompt": f"client number {i} says", "max_new_tokens": 1000, "stream": True}
    async with client.stream("POST", "/v1/generate", json=body) as response:
        await opened.wait()
        events, wanted = 0, i % 4
        if response.status_code == 200 and wanted:
            async for line in response.aiter_lines():
                events += line.startswith("data: ")
                if events >= wanted:
                    break
        return response.status_code  # leaving the block drops the connection, unread


async def _round(
    server: ServerProcess, headers: dict[str, str], clients: int
) -> tuple[list[int], dict[str, float]]:
    """One round; also returns the gauges read while every client was connected."""
    limits = httpx.Limits(max_connections=clients + 1, max_keepalive_connections=0)
    opened = asyncio.Barrier(clients + 1)
    async with httpx.AsyncClient(base_url=server.url, headers=headers, timeout=120, limits=limits) as client:
        streams = asyncio.gather(*(_open_and_leave(client, i, opened) for i in range(clients)))
        await opened.wait()
        text = (await client.get("/metrics")).text
        during = {
            name: float(line.split()[1])
            for line in text.splitlines()
            for name in GAUGES
            if line.startswith(name + " ")
        }
        return list(await streams), during


def wait_for_zero(server: ServerProcess, timeout_s: float = 15.0) -> tuple[float, dict[str, float]]:
    """Seconds until every gauge of ``GAUGES`` reads 0 (or the last reading at the timeout)."""
    started = time.perf_counter()
    while True:
        gauges = {name: server.gauges().get(name, -1.0) for name in GAUGES}
        if all(value == 0 for value in gauges.values()) or time.perf_counter() - started > timeout_s:
            return time.perf_counter() - started, gauges
        time.sleep(0.05)


def run(server: ServerProcess, key: str | None, *, clients: int, rounds: int) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {key}"} if key else {}
    with httpx.Client(base_url=server.url, headers=headers, timeout=60) as client:
        assert upload(client, TASK, native_prefix(model_geometry(server.model_dir), 8, seed=5)).is_success
        results = []
        for _ in range(rounds):
            aborted_before = server.counter("prefix_serve_generation_finished_total", reason="aborted")
            statuses, during = asyncio.run(_round(server, headers, clients))
            seconds, gauges = wait_for_zero(server)
            aborted = (
                server.counter("prefix_serve_generation_finished_total", reason="aborted") - aborted_before
            )
            after = client.post(
                "/v1/generate", json={"task_id": TASK, "prompt": "still here?", "max_new_tokens": 2}
            )
            results.append(
                {
                    "statuses": {str(s): statuses.count(s) for s in sorted(set(statuses))},
                    "while_connected": during,
                    "aborted": int(aborted),  # the requests cut short (others may have met EOS first)
                    "seconds_to_zero": round(seconds, 2),
                    "gauges": gauges,
                    "served_after": after.status_code == 200,
                }
            )
    return {
        "clients": clients,
        "rounds": results,
        "max_seconds_to_zero": max(r["seconds_to_zero"] for r in results),
        "passed": all(
            set(r["statuses"]) == {"200"} and r["served_after"] and not any(r["gauges"].values())
            for r in results
        ),
    }


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--clients", type=int, default=50)
    parser.add_argument("--rounds", type=int, default=5)
    parser.add_argument("--out", type=Path, default=Path("hardening/results/disconnects.json"))
    args = parser.parse_args()
    with hardening_server({"PREFIX_SERVE_MAX_NEW_TOKENS": "1024"}) as (server, keys, _):
        result = run(server, keys["admin"], clients=args.clients, rounds=args.rounds)
    print(
        f"{args.rounds} rounds of {args.clients} streaming clients leaving mid-stream: rows, queue and pins back "
        f"to zero within {result['max_seconds_to_zero']} s; passed: {result['passed']}"
    )
    write_result(args.out, result)
    raise SystemExit(0 if result["passed"] else 1)


if __name__ == "__main__":
    main()
