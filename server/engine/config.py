"""What an engine is built with (``EngineConfig``): the one mapping from a server's settings to the engine's
parts, shared by ``prefix-serve serve`` (``ServeSettings.engine_config``) and the benchmarks. No torch here:
the command line builds it before the model loads."""

from __future__ import annotations

from dataclasses import dataclass, field

from prefix_store.formats.limits import PrefixLimits
from server.engine.scheduler import SchedulerConfig

TaskKey = tuple[str, str]  # (tenant, task_id)
DEFAULT_TENANT = "default"  # the one tenant of a server with auth off


@dataclass(frozen=True)
class EngineConfig:
    scheduler: SchedulerConfig = field(default_factory=SchedulerConfig)  # batch size, token budget, queue
    kv_cache_bytes: int | None = None  # the KV block pool; None: what scheduler.max_batch_tokens reserves
    prompt_cache: bool = True  # full prompt blocks kept by name for later requests of the same root
    prefix_limits: PrefixLimits = field(default_factory=PrefixLimits)  # what a stored prefix may make big
    prefix_cache_bytes: int | None = None  # device bytes of resident prefixes; None: the registry's default
    prefix_host_cache_bytes: int = 0  # host-memory tier of evicted prefixes; 0: off
    prefix_reconcile_interval_s: float | None = (
        1.0  # resident versions checked against the store; None: never
    )
    preload: tuple[TaskKey, ...] = ()  # prefixes loaded before the first request
    pin_preloaded: bool = True  # kept resident while the engine runs (else they may be evicted)
    loader_threads: int = 4  # threads that load prefixes from the store
