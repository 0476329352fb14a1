"""The async engine: prefixes pinned for exactly the life of their request, aborts, bounds, no leftovers."""

from __future__ import annotations

import asyncio
import threading
from dataclasses import dataclass

import pytest

from prefix_store.cache.registry import PrefixHandle
from prefix_store.errors import PrefixNotFound
from prefix_store.prefix import Prefix
from prefix_store.storage.store import PrefixRecord
from server.engine.async_engine import AsyncEngine, EngineStopped
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationRequest, RequestTooLong
from server.engine.scheduler import QueueFull, SchedulerConfig
from testing.waiting import wait_until_async
from tests.server.engine.helpers import random_prefix, request


@dataclass
class FakePins:
    """An in-memory registry that counts pins; ``gate`` (if set) holds loads until released."""

    prefixes: dict[str, Prefix]
    gate: threading.Event | None = None
    pinned: int = 0
    loads: int = 0
    releases: int = 0

    def acquire(self, tenant: str, task_id: str) -> PrefixHandle:
        self.loads += 1
        if self.gate is not None:
            self.gate.wait(10)
        if task_id not in self.prefixes:
            raise PrefixNotFound(task_id)
        prefix = self.prefixes[task_id]
        record = PrefixRecord(
            tenant, task_id, f"1-{task_id}", prefix.digest, prefix.num_virtual_tokens, 0, 0.0, "native"
        )
        self.pinned += 1
        return PrefixHandle(record, prefix)

    def share(self, handle: PrefixHandle) -> PrefixHandle:
        self.pinned += 1
        return PrefixHandle(handle.record, handle.prefix)

    def release(self, handle: PrefixHandle) -> None:
        self.pinned -= 1
        self.releases += 1


def _task_request(base: BaseModel, request_id: str, task_id: str | None, **kwargs) -> GenerationRequest:
    plain = request(base, request_id, "Once upon a time", **kwargs)
    return GenerationRequest(**{**plain.__dict__, "task_id": task_id, "tenant": "acme"})


@pytest.fixture
def engine_factory(llama_base: BaseModel):
    engines: list[AsyncEngine] = []

    def make(pins: FakePins, **config) -> AsyncEngine:
        engine = AsyncEngine(EngineCore(llama_base, SchedulerConfig(**config), pins=pins))
        engine.start()
        engines.append(engine)
        return engine

    yield make
    for engine in engines:
        asyncio.run(engine.shutdown(grace_s=0))


def test_tasks_generate_what_the_engine_gives_their_prefix(llama_base: BaseModel, engine_factory) -> None:
    prefixes = {"t1": random_prefix(llama_base, 4, seed=1), "t2": random_prefix(llama_base, 9, seed=2)}
    pins = FakePins(prefixes)
    engine = engine_factory(pins)

    async def run():
        streams = [
            await engine.add_request(_task_request(llama_base, f"r{t}", t)) for t in ("t1", "t2", None)
        ]
        return [await s.result() for s in streams], [s.prefix_version for s in streams]

    results, versions = asyncio.run(run())
    expected = [
        generate(llama_base, [request(llama_base, "x", "Once upon a time", prefixes.get(t))])[0].token_ids
        for t in ("t1", "t2", None)
    ]
    assert [r.token_ids for r in results] == expected
    assert versions == ["1-t1", "1-t2", None]
    assert pins.pinned == 0 and engine.num_pinned == 0


def test_the_samples_of_one_request_share_one_prefix_version_across_a_swap(
    llama_base: BaseModel, engine_factory
) -> None:
    """A request's samples are submitted one by one; an upload between two of them must not give them
    different versions: the later ones pin the first one's (``prefix_of``), not the task's current one."""
    old, new = random_prefix(llama_base, 4, seed=1), random_prefix(llama_base, 4, seed=2)
    pins = FakePins({"t": old})
    engine = engine_factory(pins)

    async def run() -> tuple[list[str | None], list[list[int]]]:
        first = await engine.add_request(_task_request(llama_base, "s0", "t"))
        pins.prefixes["t"] = new  # a hot swap between the two submissions
        second = await engine.add_request(_task_request(llama_base, "s1", "t"), prefix_of="s0")
        unshared = await engine.add_request(_task_request(llama_base, "u", "t"))
        streams = [first, second, unshared]
        results = [await stream.result() for stream in streams]
        return [stream.prefix_version for stream in streams], [r.token_ids for r in results]

    versions, tokens = asyncio.run(run())
    assert versions == ["1-t", "1-t", "1-t"] and pins.loads == 2  # the sample shared the first's pin
    assert tokens[0] == tokens[1] != tokens[2]
    expected = generate(llama_base, [request(llama_base, "x", "Once upon a time", old)])[0].token_ids
    assert tokens[1] == expected and pins.pinned == 0


def test_unknown_task_and_too_long_raise_before_any_output_and_leave_nothing(
    llama_base: BaseModel, engine_factory
) -> None:
    pins = FakePins({"t": random_prefix(llama_base, 4, seed=1)})
    engine = engine_factory(pins)

    async def run():
        with pytest.raises(PrefixNotFound):
            await engine.add_request(_task_request(llama_base, "r1", "missing"))
        with pytest.raises(RequestTooLong):
            await engine.add_request(_task_request(llama_base, "r2", "t", max_new_tokens=2046))

    asyncio.run(run())
    assert pins.pinned == 0 and engine.num_pinned == 0
    assert engine.core.counts() == {"running": 0, "waiting": 0}


def test_abort_frees_the_row_and_the_pin(llama_base: BaseModel, engine_factory) -> None:
    pins = FakePins({"t": random_prefix(llama_base, 4, seed=1)})
    engine = engine_factory(pins)

    async def run():
        stream = await engine.add_request(
            _task_request(llama_base, "r", "t", max_new_tokens=1000, ignore_eos=True)
        )
        outputs = aiter(stream)
        await anext(outputs)  # it is running
        assert pins.pinned == 1
        stream.abort()
        last = [o async for o in outputs][-1]
        return last

    last = asyncio.run(run())
    assert last.finish_reason is FinishReason.ABORTED
    assert pins.pinned == 0 and engine.num_pinned == 0
    assert engine.core.counts() == {"running": 0, "waiting": 0} and engine.core.rows == []
    assert engine.core.stats().kv.blocks_used == 0


def test_a_consumer_that_walks_away_aborts_its_request(llama_base: BaseModel, engine_factory) -> None:
    pins = FakePins({"t": random_prefix(llama_base, 4, seed=1)})
    engine = engine_factory(pins)

    async def run():
        stream = await engine.add_request(
            _task_request(llama_base, "r", "t", max_new_tokens=1000, ignore_eos=True)
        )
        async for _ in stream:
            break  # the async-for closes the generator: the request is aborted
        # 1000 tokens would take far longer than this wait does: the pin comes back because of the abort
        await wait_until_async(lambda: pins.pinned == 0, "the aborted request gives its pin back")

    asyncio.run(run())
    assert pins.pinned == 0 and engine.core.counts() == {"running": 0, "waiting": 0}


def test_cancelled_while_its_prefix_loads_the_pin_is_still_released(
    llama_base: BaseModel, engine_factory
) -> None:
    gate = threading.Event()
    pins = FakePins({"t": random_prefix(llama_base, 4, seed=1)}, gate=gate)
    engine = engine_factory(pins)

    async def run():
        adding = asyncio.create_task(engine.add_request(_task_request(llama_base, "r", "t")))
        await wait_until_async(lambda: pins.loads == 1, "the prefix load is held at the gate")
        assert engine.core.counts()["waiting"] == 1  # WAITING_FOR_PREFIX
        adding.cancel()
        with pytest.raises(asyncio.CancelledError):
            await adding
        gate.set()  # the load completes after its requester left
        await wait_until_async(lambda: pins.releases == 1, "the late pin is released")

    asyncio.run(run())
    assert pins.pinned == 0 and engine.core.counts() == {"running": 0, "waiting": 0}


def test_queue_bound_refuses_with_a_typed_error(llama_base: BaseModel, engine_factory) -> None:
    gate = threading.Event()
    pins = FakePins({"t": random_prefix(llama_base, 4, seed=1)}, gate=gate)
    engine = engine_factory(pins, max_waiting=3)

    async def run():
        loading = [
            asyncio.create_task(engine.add_request(_task_request(llama_base, f"r{i}", "t"))) for i in range(3)
        ]
        await wait_until_async(
            lambda: engine.core.counts()["waiting"] == 3, "the three wait for their prefix"
        )
        with pytest.raises(QueueFull):
            await engine.add_request(_task_request(llama_base, "one-too-many", None))
        gate.set()
        for stream in await asyncio.gather(*loading):
            await stream.result()

    asyncio.run(run())
    assert pins.pinned == 0


def test_a_thousand_requests_leave_no_rows_pins_or_tensors(llama_base: BaseModel, engine_factory) -> None:
    prefixes = {f"t{i}": random_prefix(llama_base, 1 + i, seed=i) for i in range(8)}
    pins = FakePins(prefixes)
    engine = engine_factory(pins, max_batch_size=64, max_waiting=2000)

    async def run():
        async def one(i: int):
            task = None if i % 9 == 0 else f"t{i % 8}"
            stream = await engine.add_request(
                _task_request(llama_base, f"r{i}", task, max_new_tokens=1 + i % 4)
            )
            return await stream.result()

        return await asyncio.gather(*(one(i) for i in range(1000)))

    results = asyncio.run(run())
    assert len(results) == 1000 and all(r.finish_reason is FinishReason.LENGTH for r in results)
    assert pins.pinned == 0 and engine.num_pinned == 0 and not engine._routes
    assert engine.core.counts() == {"running": 0, "waiting": 0}
    assert engine.core.rows == [] and engine.core.stats().kv.blocks_used == 0  # every block went back
    assert engine.core.scheduler._requests == {} and not engine.core.scheduler._tenants


def test_shutdown_refuses_new_requests(llama_base: BaseModel) -> None:
    engine = AsyncEngine(EngineCore(llama_base, pins=FakePins({})))
    engine.start()

    async def run():
        await engine.shutdown(grace_s=1)
        with pytest.raises(EngineStopped):
            await engine.add_request(_task_request(llama_base, "late", None))

    asyncio.run(run())
    assert not engine.alive
