"""HTTP benchmark: the engine workload driven over HTTP by concurrent streaming clients, against the
same workload on the in-process async engine, in the same run.

    python -m bench.http_bench --out bench/results/http.json

The model is the engine benchmark's random 25M-parameter Llama (saved to a temporary folder and served
by a real ``prefix-serve serve`` process). For each concurrency (1, 4, 16, 32) both sides run a closed
loop of clients; reported: new tokens/s, p50/p99 latency and time to first token, and the HTTP /
in-process throughput ratio (target >= 0.9).
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import tempfile
import time
from collections.abc import Awaitable, Callable
from pathlib import Path

import httpx
import torch

from bench.engine_bench import PREFIX_LENGTHS, Timeline, build_model, build_tasks
from bench.hardening.server_process import ServerProcess
from prefix_store import encode_native
from server.engine.async_engine import AsyncEngine
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig


class InMemoryPins:
    """The prefixes the server has in its store, resident in process (the registry is not measured here)."""

    def __init__(self, prefixes: dict) -> None:
        from prefix_store.registry import PrefixHandle
        from prefix_store.store import PrefixRecord

        self._handles = {
            task: PrefixHandle(
                PrefixRecord("default", task, f"1-{task}", "0" * 64, p.num_virtual_tokens, 0, 0.0, "native"),
                p,
            )
            for task, p in prefixes.items()
        }

    def acquire(self, tenant: str, task_id: str):
        return self._handles[task_id]

    def release(self, handle) -> None:
        pass


def workload(n: int, tasks: list[str], vocab_words: list[str], seed: int) -> list[dict]:
    """Requests as JSON bodies: prompts of 16-64 words, 32 new tokens, tasks round-robin."""
    rng = random.Random(seed)
    return [
        {
            "task_id": tasks[i % len(tasks)],
            "prompt": " ".join(rng.choice(vocab_words) for _ in range(rng.randint(16, 64))),
            "max_new_tokens": 32,
        }
        for i in range(n)
    ]


async def closed_loop(
    send: Callable[[dict, Timeline], Awaitable[None]], bodies: list[dict], concurrency: int
) -> Timeline:
    timeline = Timeline()
    queue = list(reversed(bodies))

    async def client() -> None:
        while queue:
            await send(queue.pop(), timeline)

    timeline.started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    timeline.ended = time.perf_counter()
    return timeline


def http_sender(client: httpx.AsyncClient) -> Callable[[dict, Timeline], Awaitable[None]]:
    counter = iter(range(1 << 30))

    async def send(body: dict, timeline: Timeline) -> None:
        request_id = f"h{next(counter)}"
        timeline.submitted[request_id] = time.perf_counter()
        async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
            response.raise_for_status()
            async for line in response.aiter_lines():
                if line.startswith('data: {"token_id"'):
                    timeline.first_token.setdefault(request_id, time.perf_counter())
                    timeline.tokens += 1
        timeline.finished[request_id] = time.perf_counter()

    return send


def engine_sender(engine: AsyncEngine, tokenizer) -> Callable[[dict, Timeline], Awaitable[None]]:
    counter = iter(range(1 << 30))

    async def send(body: dict, timeline: Timeline) -> None:
        request_id = f"e{next(counter)}"
        timeline.submitted[request_id] = time.perf_counter()
        request = GenerationRequest(
            request_id=request_id,
            prompt_ids=tokenizer(body["prompt"]).input_ids,
            prefix=None,
            sampling=SamplingParams(),
            max_new_tokens=body["max_new_tokens"],
            task_id=body["task_id"],
        )
        async for output in await engine.add_request(request):
            if output.token_ids:
                timeline.first_token.setdefault(request_id, time.perf_counter())
                timeline.tokens += len(output.token_ids)
        timeline.finished[request_id] = time.perf_counter()

    return send


async def main_async(args: argparse.Namespace) -> dict:
    torch.set_num_threads(args.threads)
    model, base = build_model(seed=0)
    _, prefixes = build_tasks(model, PREFIX_LENGTHS)
    words = [w for w in base.tokenizer.get_vocab() if w.isalpha() and len(w) > 2][:300]
    results: dict[str, dict] = {}
    with tempfile.TemporaryDirectory() as workdir:
        model_dir, store_dir = Path(workdir) / "model", Path(workdir) / "store"
        model.save_pretrained(model_dir)
        base.tokenizer.save_pretrained(model_dir)
        env = {"PREFIX_SERVE_MAX_BATCH_SIZE": str(max(args.concurrency))}
        with ServerProcess(model_dir, store_dir.as_uri(), env=env, ready_s=120) as server:
            async with httpx.AsyncClient(base_url=server.url, timeout=600) as client:
                for task, prefix in prefixes.items():
                    blob = encode_native(prefix, base.geometry)
                    (
                        await client.put(f"/v1/admin/prefixes/{task}", files={"file": ("p", blob)})
                    ).raise_for_status()
                engine = AsyncEngine(
                    EngineCore(base, SchedulerConfig(max_batch_size=max(args.concurrency))),
                    InMemoryPins(prefixes),
                )
                engine.start()
                bodies = workload(args.requests, sorted(prefixes), words, seed=1)
                await closed_loop(http_sender(client), bodies[:8], 8)  # warm-up
                for concurrency in args.concurrency:
                    n = max(args.requests, 2 * concurrency)
                    bodies = workload(n, sorted(prefixes), words, seed=concurrency)
                    # alternate the two sides so drift in machine speed hits both
                    over_http = await closed_loop(http_sender(client), bodies, concurrency)
                    in_process = await closed_loop(engine_sender(engine, base.tokenizer), bodies, concurrency)
                    results[f"c{concurrency}"] = {
                        "http": over_http.summary(),
                        "in_process": in_process.summary(),
                        "http_over_in_process_throughput": over_http.summary()["tokens_per_s"]
                        / in_process.summary()["tokens_per_s"],
                    }
                await engine.shutdown(grace_s=0)
    return results


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", type=int, default=48)
    parser.add_argument("--concurrency", type=int, nargs="+", default=[1, 4, 16, 32])
    parser.add_argument("--threads", type=int, default=2)
    parser.add_argument("--out", type=Path, default=Path("bench/results/http.json"))
    args = parser.parse_args()
    results = asyncio.run(main_async(args))
    header = f"{'clients':>8}{'http tok/s':>12}{'engine tok/s':>14}{'ratio':>8}{'p50 lat s':>11}{'p99 lat s':>11}{'p50 TTFT s':>12}"
    print(header)
    print("-" * len(header))
    for name, r in results.items():
        h = r["http"]
        print(
            f"{name[1:]:>8}{h['tokens_per_s']:>12.1f}{r['in_process']['tokens_per_s']:>14.1f}"
            f"{r['http_over_in_process_throughput']:>8.2f}{h['p50_latency_s']:>11.3f}{h['p99_latency_s']:>11.3f}"
            f"{h['p50_ttft_s']:>12.3f}"
        )
    args.out.parent.mkdir(parents=True, exist_ok=True)
    args.out.write_text(
        json.dumps({"config": {k: str(v) for k, v in vars(args).items()}, "results": results}, indent=2)
    )
    print(f"\nwrote {args.out}")


if __name__ == "__main__":
    main()
