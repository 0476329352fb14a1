"""Clients that drive a system: a closed loop (each of N clients sends its next request when its last
one finished) or an open loop (Poisson arrivals, whatever the system is doing), over a system that is
stepped from this thread, so nothing but the system itself is measured."""

from __future__ import annotations

import random
import time
from collections import deque
from collections.abc import Sequence
from typing import Protocol

from server.benchmark.timeline import Timeline
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.request import GenerationRequest
from server.engine.scheduler import SchedulerConfig

Event = tuple[str, int, bool]  # request id, new tokens, finished


class System(Protocol):
    """Something that serves requests: ``submit`` queues one, ``advance`` does a unit of work."""

    def submit(self, request: GenerationRequest) -> None: ...

    def advance(self) -> list[Event]: ...


class EngineSystem:
    """The engine core, continuous batching (or static batching: new rows only into an empty batch)."""

    def __init__(
        self, base: BaseModel, *, max_batch_size: int, static: bool = False, prompt_cache: bool = True
    ) -> None:
        config = SchedulerConfig(max_batch_size=max_batch_size, max_batch_tokens=1 << 16, max_waiting=1 << 16)
        self.core = EngineCore(base, config, static_batching=static, prompt_cache=prompt_cache)

    def submit(self, request: GenerationRequest) -> None:
        self.core.add_request(request)

    def advance(self) -> list[Event]:
        return [(o.request_id, len(o.token_ids), o.finish_reason is not None) for o in self.core.step()]


def closed_loop(system: System, requests: Sequence[GenerationRequest], concurrency: int) -> Timeline:
    """``concurrency`` clients, each sending its next request when its previous one finishes."""
    timeline, pending, in_flight = Timeline(), deque(requests), 0
    timeline.started = time.perf_counter()
    while pending or in_flight:
        while pending and in_flight < concurrency:
            request = pending.popleft()
            timeline.submitted[request.request_id] = time.perf_counter()
            system.submit(request)
            in_flight += 1
        in_flight -= timeline.record(system.advance())
    timeline.ended = time.perf_counter()
    return timeline


def open_loop(system: System, requests: Sequence[GenerationRequest], rate: float, seed: int = 3) -> Timeline:
    """Requests arrive as a Poisson process of ``rate`` per second; latency counts from arrival."""
    rng = random.Random(seed)
    arrivals, at = deque(), 0.0
    for request in requests:
        at += rng.expovariate(rate)
        arrivals.append((at, request))
    timeline, in_flight = Timeline(), 0
    timeline.started = start = time.perf_counter()
    while arrivals or in_flight:
        now = time.perf_counter() - start
        while arrivals and arrivals[0][0] <= now:
            at, request = arrivals.popleft()
            timeline.submitted[request.request_id] = start + at
            system.submit(request)
            in_flight += 1
        if not in_flight:
            time.sleep(max(0.0, arrivals[0][0] - now))
            continue
        in_flight -= timeline.record(system.advance())
    timeline.ended = time.perf_counter()
    return timeline
