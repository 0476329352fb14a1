"""Building the serving engine from its configuration: the prefix registry over the store, the engine core
with its KV pool, and the loop thread (``start_engine``). The server and the benchmarks build it here."""

from __future__ import annotations

import functools
from dataclasses import dataclass

from prefix_store.cache.registry import PrefixRegistry
from prefix_store.storage.store import PrefixStore
from server.engine.async_engine import AsyncEngine
from server.engine.base_model import BaseModel
from server.engine.config import EngineConfig
from server.engine.core import EngineCore
from server.engine.soft_prompts import soft_prompt_prefix


@dataclass(frozen=True)
class RunningEngine:
    """A started engine and the registry it pins prefixes in."""

    registry: PrefixRegistry
    engine: AsyncEngine

    async def stop(self, grace_s: float) -> None:
        """Let running requests finish within ``grace_s`` (the rest end ``aborted``), stop the loop, and
        close the registry (the store stays its owner's)."""
        await self.engine.shutdown(grace_s)
        self.registry.close()


def start_engine(base: BaseModel, store: PrefixStore, config: EngineConfig) -> RunningEngine:
    """The registry (with ``config.preload`` loaded) and the engine, its loop started. Raises ``ValueError``
    for a KV pool too small for the batch."""
    registry = PrefixRegistry(
        store,
        base.geometry,
        device=base.device,
        dtype=base.dtype,
        limits=config.prefix_limits,
        budget_bytes=config.prefix_cache_bytes,
        host_budget_bytes=config.prefix_host_cache_bytes,
        reconcile_interval_s=config.prefix_reconcile_interval_s,
        encode_soft_prompt=functools.partial(soft_prompt_prefix, base),
    )
    try:
        core = EngineCore(
            base,
            config.scheduler,
            pins=registry,
            kv_cache_bytes=config.kv_cache_bytes,
            prompt_cache=config.prompt_cache,
        )
    except ValueError:
        registry.close()
        raise
    # failures are logged, not fatal: a missing task should not keep the server down
    registry.preload(config.preload, pin=config.pin_preloaded)
    engine = AsyncEngine(core, loader_threads=config.loader_threads)
    engine.start()
    return RunningEngine(registry, engine)
