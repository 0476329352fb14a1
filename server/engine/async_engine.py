"""The engine as asyncio code sees it: ``add_request`` returns a stream of outputs; one background thread
owns the model and runs ``EngineCore.step`` in a loop; prefixes are acquired (loaded and pinned) on a
separate pool of loader threads, so the loop never waits on storage. The pin then belongs to the
request's record in the core, which releases it exactly once when the request ends, however it ends;
this layer keeps only each request's delivery queue."""

from __future__ import annotations

import asyncio
import logging
import threading
import time
from collections.abc import AsyncIterator, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass

from prefix_store.cache.pins import acquire_async
from server.engine.core import EngineCore, EngineStats
from server.engine.kv_cache import PagedKVCache
from server.engine.request import GenerationRequest, GenerationResult, RequestOutput

log = logging.getLogger(__name__)

_IDLE_WAIT_S = 0.05  # how long an idle loop sleeps before re-checking deadlines
_STALL_S = 120.0  # a loop that has not come round for this long is reported not alive


class EngineStopped(Exception):
    """The engine is shutting down and admits no new requests."""


@dataclass
class _Route:
    """Where a request's outputs go."""

    loop: asyncio.AbstractEventLoop
    queue: asyncio.Queue[RequestOutput]
    on_done: Callable[[], None] | None = None  # called once when the request leaves the engine
    on_output: Callable[[RequestOutput], None] | None = None  # sees every output (engine thread)


class RequestStream:
    """The outputs of one request, as they come. Closing it before the end aborts the request."""

    def __init__(
        self, engine: AsyncEngine, request: GenerationRequest, route: _Route, prefix_version: str | None
    ) -> None:
        self._engine = engine
        self.request = request
        self._route = route
        self.prefix_version = prefix_version  # the version of the task's prefix it runs with
        self.finished = False

    def __aiter__(self) -> AsyncIterator[RequestOutput]:
        return self._outputs()

    async def _outputs(self) -> AsyncIterator[RequestOutput]:
        try:
            while not self.finished:
                output = await self._route.queue.get()
                self.finished = output.finish_reason is not None
                yield output
        finally:
            self.abort()  # a no-op after the end; else the consumer left early (client gone, cancelled)

    def abort(self) -> None:
        """End the request now (its final output says ``aborted``)."""
        if not self.finished:
            self._engine.abort(self.request.request_id)

    async def result(self) -> GenerationResult:
        """Wait for the end; all outputs merged."""
        return GenerationResult.from_outputs([output async for output in self])


class AsyncEngine:
    def __init__(self, core: EngineCore, *, loader_threads: int = 4) -> None:
        """Requests for a task need ``core.pins`` (the prefix registry)."""
        self.core = core
        self._loader = ThreadPoolExecutor(max_workers=loader_threads, thread_name_prefix="prefix-loader")
        self._routes: dict[str, _Route] = {}
        self._routes_lock = threading.Lock()
        self._wake = threading.Event()
        self._stopping = threading.Event()
        self._accepting = True
        self._thread = threading.Thread(target=self._loop, name="engine-loop", daemon=True)
        self.last_step_at = time.monotonic()  # liveness: the loop updates it every iteration

    def start(self) -> None:
        self._thread.start()

    @property
    def alive(self) -> bool:
        """The loop thread runs and has come round recently (a step that hangs makes this False)."""
        recent = time.monotonic() - self.last_step_at < _STALL_S
        return self._thread.is_alive() and not self._stopping.is_set() and recent

    # -- requests ---------------------------------------------------------------------------------
    async def add_request(
        self,
        request: GenerationRequest,
        on_done: Callable[[], None] | None = None,
        on_output: Callable[[RequestOutput], None] | None = None,
        *,
        prefix_of: str | None = None,
    ) -> RequestStream:
        """Queue ``request``, loading and pinning its task's prefix first (``request.task_id``).

        Raises ``EngineStopped``, ``QueueFull``, ``RequestTooLong``/``RequestTooLarge`` and the
        registry's errors (unknown task, store unavailable) before any output is produced.
        ``on_done`` is called exactly once when the request leaves the engine, however it ends
        (also when this call raises). ``on_output`` sees each of its outputs as it is delivered, from
        the engine's thread (metrics). ``prefix_of``: the id of a request whose prefix version this one
        shares (another sample of the same request), where that one still holds it.
        """
        if not self._accepting:
            if on_done is not None:
                on_done()
            raise EngineStopped("the server is shutting down")
        route = _Route(asyncio.get_running_loop(), asyncio.Queue(), on_done, on_output=on_output)
        with self._routes_lock:
            self._routes[request.request_id] = route
        try:
            self.core.add_request(request, prefix_ready=request.task_id is None)
        except BaseException:
            self._unroute(request.request_id)
            raise
        version = await self._attach_prefix(request, prefix_of) if request.task_id is not None else None
        self._wake.set()
        return RequestStream(self, request, route, version)

    async def _attach_prefix(self, request: GenerationRequest, prefix_of: str | None) -> str | None:
        """Pin the task's prefix (``prefix_of``'s version, if that request still holds one) and give it to
        the request's record; the version it pinned."""
        assert self.core.pins is not None and request.task_id is not None
        try:
            pin = self.core.shared_pin(prefix_of) if prefix_of is not None else None
            if pin is None:
                pin = await acquire_async(
                    self.core.pins, request.tenant, request.task_id, executor=self._loader
                )
        except BaseException:  # a failed load, or the caller cancelled (a late pin is given back)
            self.core.discard(request.request_id)
            self._unroute(request.request_id)
            raise
        try:
            accepted = self.core.set_prefix(request.request_id, pin)
        except BaseException:
            self._unroute(request.request_id)
            self.core.pins.release(pin)
            raise
        if not accepted:  # aborted or expired while loading: its final output is already queued
            self.core.pins.release(pin)
            self._unroute(request.request_id)
        return pin.record.version

    def abort(self, request_id: str) -> None:
        self.core.abort(request_id)
        self._wake.set()

    async def forget_cached(self, tenant: str) -> int:
        """No later request of ``tenant`` finds its prompt blocks cached (the admin's reset); how many
        blocks were named for it."""
        return await self._on_engine_thread(lambda kv: kv.forget(tenant))

    async def cached_blocks(self, tenant: str) -> int:
        """Blocks named for ``tenant`` now: held by its rows, or cached for a later hit."""
        return await self._on_engine_thread(lambda kv: kv.blocks.named_blocks(tenant))

    async def _on_engine_thread(self, task: Callable[[PagedKVCache], int]) -> int:
        done = self.core.prompt_cache.on_engine_thread(task)
        self._wake.set()
        return await asyncio.wrap_future(done)

    # -- the loop thread -----------------------------------------------------------------------
    def _loop(self) -> None:
        while not self._stopping.is_set():
            self.last_step_at = time.monotonic()
            self._wake.clear()
            try:
                outputs = self.core.step()
            except Exception:
                log.exception("engine step failed")
                outputs = []
            self._deliver(outputs)
            if not outputs and self.core.counts()["running"] == 0:
                self._wake.wait(_IDLE_WAIT_S)

    def _deliver(self, outputs: list[RequestOutput]) -> None:
        """Hand a step's outputs to their streams: one wake-up of each event loop per step, not one per
        output (fewer thread switches while the step's rows stream)."""
        batches: dict[asyncio.AbstractEventLoop, list[tuple[asyncio.Queue, RequestOutput]]] = {}
        for output in outputs:
            with self._routes_lock:
                route = self._routes.get(output.request_id)
            if route is None:
                continue
            if route.on_output is not None:
                try:
                    route.on_output(output)
                except Exception:
                    log.exception("output observer failed")
            if output.finish_reason is not None:
                self._unroute(output.request_id)  # the core gave its pin back before the step returned
            batches.setdefault(route.loop, []).append((route.queue, output))
        for loop, batch in batches.items():
            try:
                loop.call_soon_threadsafe(_put_all, batch)
            except RuntimeError:  # that loop has closed: nobody is listening any more
                log.debug("dropped %d outputs for a closed event loop", len(batch))

    def _unroute(self, request_id: str) -> _Route | None:
        with self._routes_lock:
            route = self._routes.pop(request_id, None)
        if route is not None and route.on_done is not None:
            route.on_done()
        return route

    def counts(self) -> dict[str, int]:
        """Requests admitted (prefilling or decoding) and waiting, as ``EngineCore.counts``."""
        return self.core.counts()

    @property
    def token_budget(self) -> int:
        """The most tokens one request may reserve, as ``EngineCore.token_budget``."""
        return self.core.token_budget

    @property
    def num_pinned(self) -> int:
        """Requests holding a prefix pin (for tests and gauges)."""
        return self.core.num_pinned

    def stats(self) -> EngineStats:
        """Steps, prefilled tokens and the KV pool, as ``EngineCore.stats``."""
        return self.core.stats()

    # -- shutdown ------------------------------------------------------------------------------
    async def drain(self, grace_s: float) -> None:
        """Stop admitting, let running requests finish within ``grace_s``, then abort the rest (each ends
        ``aborted``) and wait up to 2 s for their last outputs to be delivered."""
        self._accepting = False
        deadline = time.monotonic() + grace_s
        while self.core.has_work and time.monotonic() < deadline:
            await asyncio.sleep(0.05)
        with self._routes_lock:
            remaining = list(self._routes)
        for request_id in remaining:
            self.abort(request_id)
        while self._routes and time.monotonic() < deadline + 2.0:
            await asyncio.sleep(0.02)

    async def shutdown(self, grace_s: float = 10.0) -> None:
        """``drain``, then stop the loop (a drained engine stops at once)."""
        await self.drain(grace_s)
        self._stopping.set()
        self._wake.set()
        await asyncio.to_thread(self._thread.join, 5.0)
        self._loader.shutdown(wait=False, cancel_futures=True)


def _put_all(batch: list[tuple[asyncio.Queue, RequestOutput]]) -> None:
    for queue, output in batch:
        queue.put_nowait(output)
