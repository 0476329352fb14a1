"""The serving stack as a benchmark drives it: in process (a filesystem store holding the tasks, a
``PrefixRegistry`` and the ``AsyncEngine``: everything the server runs but HTTP) or over HTTP
(streaming ``POST /v1/generate``), by asyncio clients in a closed loop."""

from __future__ import annotations

import asyncio
import itertools
import time
from collections.abc import Awaitable, Callable, Mapping, Sequence
from pathlib import Path
from types import TracebackType

import httpx

from prefix_store.formats.native import encode_native
from prefix_store.prefix import Prefix
from prefix_store.storage.store import open_store
from server.benchmark.timeline import Timeline
from server.engine.base_model import BaseModel
from server.engine.config import DEFAULT_TENANT, EngineConfig
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.startup import start_engine

Sender = Callable[[dict, Timeline], Awaitable[None]]  # sends one body, records it on the timeline


class ServerRefused(Exception):
    """The server answered a benchmark request with an error status (its message says which and why)."""


def upload(store_url: str, base: BaseModel, prefixes: Mapping[str, Prefix]) -> None:
    """Store each task's prefix (native format) as its current version."""
    with open_store(store_url) as store:
        for task_id, prefix in prefixes.items():
            blob = encode_native(prefix, base.geometry)
            store.put(
                DEFAULT_TENANT,
                task_id,
                blob,
                num_virtual_tokens=prefix.num_virtual_tokens,
                source_format="native",
            )


class InProcessServer:
    """``async with InProcessServer(base, store_url, ...) as server: await server.send(body, timeline)``.

    ``budget_bytes`` is the registry's device budget (None: the server's default); ``preload`` tasks
    are loaded before the first request (all resident)."""

    def __init__(
        self,
        base: BaseModel,
        store_url: str,
        *,
        max_batch_size: int,
        budget_bytes: int | None = None,
        preload: Sequence[str] = (),
    ) -> None:
        self.base = base
        self.store = open_store(store_url)
        self.config = EngineConfig(
            scheduler=SchedulerConfig(
                max_batch_size=max_batch_size, max_batch_tokens=1 << 16, max_waiting=1 << 16
            ),
            prefix_cache_bytes=budget_bytes,
            prefix_reconcile_interval_s=None,
            preload=tuple((DEFAULT_TENANT, task_id) for task_id in preload),
            pin_preloaded=False,  # resident at the start, then evicted like any other (the cache curve)
        )
        self._ids = itertools.count()

    async def __aenter__(self) -> InProcessServer:
        self.running = start_engine(self.base, self.store, self.config)
        self.engine, self.registry = self.running.engine, self.running.registry
        return self

    async def __aexit__(
        self, exc_type: type[BaseException] | None, exc: BaseException | None, tb: TracebackType | None
    ) -> None:
        await self.running.stop(grace_s=0)
        self.store.close()

    async def send(self, body: dict, timeline: Timeline) -> None:
        """One request, as the HTTP route would submit it (tokenised prompt, task pinned on a loader thread)."""
        request_id = f"e{next(self._ids)}"
        request = GenerationRequest(
            request_id=request_id,
            prompt_ids=self.base.tokenizer(body["prompt"]).input_ids,
            prefix=None,
            sampling=SamplingParams(),
            max_new_tokens=body["max_new_tokens"],
            task_id=body["task_id"],
        )
        timeline.submitted[request_id] = time.perf_counter()
        async for output in await self.engine.add_request(request):
            timeline.record([(request_id, len(output.token_ids), output.finish_reason is not None)])


def http_sender(client: httpx.AsyncClient) -> Sender:
    """Streams ``POST /v1/generate`` (SSE) and counts token events; any HTTP error is raised."""
    ids = itertools.count()

    async def send(body: dict, timeline: Timeline) -> None:
        request_id = f"h{next(ids)}"
        timeline.submitted[request_id] = time.perf_counter()
        async with client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
            if response.status_code != 200:
                await response.aread()
                raise ServerRefused(f"POST /v1/generate answered {response.status_code}: {response.text}")
            async for line in response.aiter_lines():
                if line.startswith('data: {"token_id"'):
                    timeline.record([(request_id, 1, False)])
        timeline.record([(request_id, 0, True)])

    return send


async def closed_loop(send: Sender, bodies: Sequence[dict], concurrency: int) -> Timeline:
    """``concurrency`` asyncio clients, each sending its next body when its previous one finished."""
    timeline, queue = Timeline(), list(reversed(bodies))

    async def client() -> None:
        while queue:
            await send(queue.pop(), timeline)

    timeline.started = time.perf_counter()
    await asyncio.gather(*(client() for _ in range(concurrency)))
    timeline.ended = time.perf_counter()
    return timeline


def save_model(base: BaseModel, model_dir: Path) -> Path:
    """Write the model and tokenizer where ``prefix-serve serve --model`` can load them."""
    base.model.save_pretrained(model_dir)
    base.tokenizer.save_pretrained(model_dir)
    return model_dir
