"""Pinning seen from the engine: what it needs of the registry (``PrefixPins``, which a test fake can
provide too) and an awaitable acquire that never leaks a pin when its caller is cancelled."""

from __future__ import annotations

import asyncio
from concurrent.futures import Executor
from typing import TYPE_CHECKING, Protocol

if TYPE_CHECKING:
    from prefix_store.cache.registry import PrefixHandle


class PrefixPins(Protocol):
    """What the engine needs of the registry: pin a task's prefix, pin the same version again (the samples of
    one request share a version), give a pin back."""

    def acquire(self, tenant: str, task_id: str) -> PrefixHandle: ...

    def share(self, handle: PrefixHandle) -> PrefixHandle: ...

    def release(self, handle: PrefixHandle) -> None: ...


async def acquire_async(
    pins: PrefixPins, tenant: str, task_id: str, *, executor: Executor | None = None
) -> PrefixHandle:
    """``pins.acquire`` on ``executor`` (None: the loop's default), awaited. If the caller is cancelled
    while the load runs, the pin that arrives later is released, so it never leaks."""
    loading = asyncio.get_running_loop().run_in_executor(executor, pins.acquire, tenant, task_id)
    try:
        return await asyncio.shield(loading)
    except asyncio.CancelledError:

        def release_abandoned(done: asyncio.Future[PrefixHandle]) -> None:
            if not done.cancelled() and done.exception() is None:
                pins.release(done.result())

        loading.add_done_callback(release_abandoned)
        raise
