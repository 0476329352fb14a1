"""A latency probe, in its own light process (httpx only, no torch): one generate request every
``--interval`` seconds for ``--seconds``; prints one JSON list of ``[status, seconds]``.

The load script's clients measure their own latencies too, but on a small machine their event loop
shares the CPU with dozens of coroutines and the server; this probe's clock is its own. Run by
``hardening.load``: ``python -m hardening.probe URL KEY --seconds 60``.
"""

from __future__ import annotations

import argparse
import json
import time

import httpx


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__)
    parser.add_argument("url")
    parser.add_argument("key")
    parser.add_argument("--task", default=None)
    parser.add_argument("--seconds", type=float, default=60.0)
    parser.add_argument("--interval", type=float, default=0.02)
    parser.add_argument("--max-new-tokens", type=int, default=16)
    args = parser.parse_args()
    body = {"task_id": args.task, "prompt": "A probe asks", "max_new_tokens": args.max_new_tokens}
    samples: list[tuple[int, float]] = []
    deadline = time.monotonic() + args.seconds
    with httpx.Client(
        base_url=args.url, headers={"Authorization": f"Bearer {args.key}"}, timeout=60
    ) as client:
        while time.monotonic() < deadline:
            started = time.perf_counter()
            try:
                status = client.post("/v1/generate", json=body).status_code
            except httpx.TransportError:
                status = 0
            samples.append((status, time.perf_counter() - started))
            time.sleep(args.interval)
    print(json.dumps(samples))


if __name__ == "__main__":
    main()
