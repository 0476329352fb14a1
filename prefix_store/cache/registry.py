"""The device registry: ``acquire(tenant, task_id)`` pins a device-resident prefix of the task's current
version (or a LoRA task's weights, held by the same rules: ``PrefixHandle.value``); ``release`` gives the
pin back. The engine calls ``acquire`` from a worker thread when it admits
a request and ``release`` exactly once when the request ends, however it ends.

- **Version check on every acquire**: the task's small record is read first, so an acquire that starts
  after an upload's 2xx gets the new version, on this replica and on every other one (hot swap);
  requests already holding the old version keep it until they release it.
- **Single flight**: concurrent acquirers of a version that is not resident wait for one load.
- **Fetch, then place**: the blob is read from the store (or the host tier) and decoded and cast on
  the CPU (a soft prompt becomes its virtual tokens' keys and values: ``encode_soft_prompt``, once per
  load); only then is its size charged to the budget and the prefix copied to the device.
- **Byte budget**: resident bytes never exceed ``budget_bytes``; to make room, the least recently used
  *unpinned* versions are evicted. If pinned versions leave no room, the acquire waits up to
  ``cache_full_wait_s`` for releases, then fails with ``PrefixCacheFull``: the budget is never exceeded.
- **Invalidation**: the store's change feed (fast hint) and a reconcile of every cached task every
  ``reconcile_interval_s`` (and at once when the feed reconnects) drop superseded or deleted versions
  as soon as they are unpinned, and load the new version of a task that was resident (prefetch).
- **Store outage**: when reading the record fails with ``StoreUnavailable`` and the task's latest
  known version is resident, that version is served (it is as fresh as the last feed event or
  reconcile); cold loads fail at once with ``StoreUnavailable``. The store is retried after
  ``store_retry_s`` (and probed by the reconcile), so service recovers without a restart.
"""

from __future__ import annotations

import contextlib
import copy
import logging
import threading
import time
from collections.abc import Iterable, Iterator

import torch

from prefix_store.cache.host_tier import HostTier
from prefix_store.cache.invalidation import VersionWatcher
from prefix_store.cache.loading import SoftPromptEncoder, default_budget_bytes, fetch_prefix, place_prefix
from prefix_store.cache.pins import PrefixPins, acquire_async
from prefix_store.cache.registry_stats import Counters, LatencyWindow, RegistryStats, StoreHealth
from prefix_store.cache.residency import CacheEntry, LoadState, ResidentSet
from prefix_store.errors import PrefixCacheFull, PrefixNotFound, PrefixStoreError, StoreUnavailable
from prefix_store.formats.limits import PrefixLimits
from prefix_store.geometry import ModelGeometry
from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import Resident
from prefix_store.storage.names import validate_task_id, validate_tenant
from prefix_store.storage.store import PrefixRecord, PrefixStore, TaskKey

__all__ = [
    "LoadState",
    "PrefixHandle",
    "PrefixPins",
    "PrefixRegistry",
    "RegistryStats",
    "acquire_async",
    "default_budget_bytes",
]

log = logging.getLogger(__name__)


class PrefixHandle:
    """A pinned task of one fixed version — a prefix (a soft prompt's keys and values are one) or a LoRA
    task — on the device in the model dtype. Give it back with ``PrefixRegistry.release`` exactly once,
    however the request that holds it ends, and drop every reference to its value then: the budget counts
    a released version as free memory once evicted."""

    __slots__ = ("_entry", "_released", "record", "value")

    def __init__(self, record: PrefixRecord, value: Resident, entry: CacheEntry | None = None) -> None:
        self.record = record
        self.value = value
        self._entry = entry
        self._released = False

    @property
    def prefix(self) -> Prefix | None:
        """The task's prefix; None for a LoRA task."""
        return self.value if isinstance(self.value, Prefix) else None

    @property
    def lora(self) -> LoraAdapter | None:
        """The task's LoRA updates; None for a prefix task."""
        return self.value if isinstance(self.value, LoraAdapter) else None

    @property
    def num_virtual_tokens(self) -> int:
        """Tokens the task puts before its rows' prompts (0 for a LoRA task)."""
        return self.value.num_virtual_tokens

    def __repr__(self) -> str:
        return f"PrefixHandle({self.record.tenant}/{self.record.task_id}@{self.record.version})"


class PrefixRegistry:
    """Keeps prefixes on the device within a byte budget; see the module docstring for the rules.

    Thread-safe. Starts a maintenance thread (reconcile) and subscribes to the store's change feed;
    ``close`` stops both.
    """

    def __init__(
        self,
        store: PrefixStore,
        geometry: ModelGeometry,
        *,
        device: torch.device | str,
        dtype: torch.dtype,
        limits: PrefixLimits,
        budget_bytes: int | None = None,
        host_budget_bytes: int = 0,
        reconcile_interval_s: float | None = 1.0,
        store_retry_s: float = 1.0,
        cache_full_wait_s: float = 0.0,
        prefetch_on_change: bool = True,
        encode_soft_prompt: SoftPromptEncoder | None = None,
    ) -> None:
        self.store = store
        self.encode_soft_prompt = encode_soft_prompt
        self.geometry = geometry
        self.device = torch.device(device)
        self.dtype = dtype
        self.limits = limits
        self.reconcile_interval_s = reconcile_interval_s
        self.cache_full_wait_s = cache_full_wait_s
        self.prefetch_on_change = prefetch_on_change
        self._residents = ResidentSet(budget_bytes or default_budget_bytes(self.device))
        self._host = HostTier(host_budget_bytes)
        self._lock = threading.Lock()
        self._room = threading.Condition(self._lock)  # notified when pins drop or entries leave
        self._health = StoreHealth(store_retry_s)
        self._latency = LatencyWindow()
        self._counts = Counters()
        self._sticky: dict[TaskKey, PrefixHandle] = {}  # preloaded with pin=True
        self._closed = threading.Event()
        self._watcher = VersionWatcher(
            store,
            tracked=self._tracked,
            on_version=self._observe,
            on_store=self._store_answered,
            store_is_down=lambda: not self._health.available,
            interval_s=reconcile_interval_s,
        )

    # -- pinning -------------------------------------------------------------------------------------

    def acquire(self, tenant: str, task_id: str) -> PrefixHandle:
        """Pin the task's current version, loading it if it is not resident.

        Blocks on I/O: call it from a worker thread (or use ``acquire_async``). Raises
        ``PrefixNotFound``, ``StoreUnavailable`` (store down and the task not resident),
        ``PrefixValidationError`` (the stored prefix does not fit this model), ``PrefixCacheFull``.
        """
        validate_tenant(tenant)
        validate_task_id(task_id)
        if self._closed.is_set():
            raise RuntimeError("the prefix registry is closed")
        record = self._current_record(tenant, task_id)
        for _attempt in range(3):
            entry, leader = self._pin(record)
            if leader:
                self._load(entry)
            else:
                entry.settled.wait()
            if entry.state is LoadState.READY:
                assert entry.value is not None
                return PrefixHandle(entry.record, entry.value, entry)
            error = entry.error
            assert error is not None
            if isinstance(error, PrefixNotFound):  # the blob went: was the task replaced meanwhile?
                fresh = self._current_record(tenant, task_id)
                if fresh.version != record.version:
                    record = fresh
                    continue
            raise _own_copy(error) from error
        raise StoreUnavailable(f"{task_id!r} keeps changing while it loads; try again")

    async def acquire_async(self, tenant: str, task_id: str) -> PrefixHandle:
        """``acquire`` on the loop's default executor (see ``acquire_async``)."""
        return await acquire_async(self, tenant, task_id)

    def share(self, handle: PrefixHandle) -> PrefixHandle:
        """Another pin of ``handle``'s version (the same prefix, for another request of the same caller,
        whatever uploads came since): released on its own, like any handle."""
        with self._room:
            if handle._released:
                raise ValueError(f"{handle!r} was released: it cannot be shared")
            if handle._entry is not None:
                handle._entry.pins += 1
            return PrefixHandle(handle.record, handle.value, handle._entry)

    def release(self, handle: PrefixHandle) -> None:
        """Unpin ``handle``. A second release of the same handle is ignored (and logged)."""
        with self._room:
            if handle._released:
                log.warning("%r was released twice; ignoring", handle)
                return
            handle._released = True
            entry = handle._entry
            if entry is None:
                return
            entry.pins -= 1
            if entry.pins == 0:
                if entry.stale and entry.state is LoadState.READY:
                    self._residents.remove(entry)
                    self._counts.invalidations += 1
                self._room.notify_all()

    @contextlib.contextmanager
    def pinned(self, tenant: str, task_id: str) -> Iterator[PrefixHandle]:
        """``with registry.pinned(tenant, task_id) as handle:`` acquire, and release on the way out."""
        handle = self.acquire(tenant, task_id)
        try:
            yield handle
        finally:
            self.release(handle)

    def preload(self, tasks: Iterable[TaskKey], *, pin: bool = False) -> dict[TaskKey, PrefixStoreError]:
        """Load ``(tenant, task_id)`` pairs now (at start-up, say). With ``pin``, keep each resident,
        following its new versions, until ``unpin`` or ``close``. Returns (and logs) the failures."""
        failures: dict[TaskKey, PrefixStoreError] = {}
        for tenant, task_id in tasks:
            try:
                handle = self.acquire(tenant, task_id)
            except PrefixStoreError as exc:
                log.warning("could not preload %s/%s: %s", tenant, task_id, exc)
                failures[(tenant, task_id)] = exc
                continue
            if pin:
                self._set_sticky((tenant, task_id), handle)
            else:
                self.release(handle)
        return failures

    def unpin(self, tenant: str, task_id: str) -> None:
        """Drop the pin ``preload(..., pin=True)`` holds on the task (it becomes evictable)."""
        self._set_sticky((tenant, task_id), None)

    # -- what is resident ----------------------------------------------------------------------------

    def is_resident(self, record: PrefixRecord) -> bool:
        with self._lock:
            entry = self._residents.get((record.tenant, record.task_id, record.version))
            return entry is not None and entry.state is LoadState.READY

    def resident_version(self, tenant: str, task_id: str) -> str | None:
        """The version of the task this registry would serve without loading, if any."""
        with self._lock:
            entry = self._residents.latest_ready((tenant, task_id))
            return entry.record.version if entry else None

    def forget(self, tenant: str, task_id: str) -> None:
        """The task was deleted: new acquires must not get it (holders finish on their pin)."""
        self._observe((tenant, task_id), None, deleted=True)

    def stats(self) -> RegistryStats:
        with self._lock:
            residents, counts = self._residents, self._counts
            return RegistryStats(
                **counts.__dict__,
                resident_bytes=residents.charged_bytes,
                peak_resident_bytes=residents.peak_bytes,
                budget_bytes=residents.budget_bytes,
                resident_count=residents.resident_count,
                pinned_count=residents.pinned_count,
                host_bytes=self._host.bytes,
                host_budget_bytes=self._host.budget_bytes,
                host_evictions=self._host.evictions,
                store_available=self._health.available,
                load_latency=self._latency.summary(),
            )

    def reconcile(self) -> None:
        """Re-check every cached task against the store now (a background thread does it on its own)."""
        self._watcher.reconcile()

    def close(self) -> None:
        """Stop the maintenance thread and the feed subscription; drop preload pins. Idempotent."""
        if self._closed.is_set():
            return
        self._closed.set()
        self._watcher.close()
        with self._lock:
            sticky, self._sticky = list(self._sticky.values()), {}
        for handle in sticky:
            self.release(handle)

    def __enter__(self) -> PrefixRegistry:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    # -- loading -------------------------------------------------------------------------------------

    def _current_record(self, tenant: str, task_id: str) -> PrefixRecord:
        """The task's current record from the store, or, if the store is down, the resident one."""
        key = (tenant, task_id)
        if self._health.should_try():
            try:
                record = self.store.head(tenant, task_id)
            except StoreUnavailable as exc:
                self._health.mark_down(exc)
            except PrefixNotFound:
                self._health.mark_up()
                self._observe(key, None, deleted=True)
                raise
            else:
                self._health.mark_up()
                return record
        with self._lock:
            entry = self._residents.latest_ready(key)
            if entry is None:
                raise StoreUnavailable(f"the prefix store is unavailable and {task_id!r} is not cached")
            self._counts.served_during_outage += 1
            return entry.record

    def _pin(self, record: PrefixRecord) -> tuple[CacheEntry, bool]:
        """Pin the entry of ``record``'s version, creating it (LOADING) if absent. True: we load it."""
        with self._room:
            self._observe_locked(record.key, record.version, deleted=False, track=True)
            entry = self._residents.get((record.tenant, record.task_id, record.version))
            if entry is None:
                entry = self._residents.add(record)
                entry.pins = 1
                self._counts.misses += 1
                return entry, True
            entry.pins += 1
            if entry.state is LoadState.READY:
                self._counts.hits += 1
                self._residents.touch(entry)
            else:
                self._counts.coalesced += 1
            return entry, False

    def _load(self, entry: CacheEntry) -> None:
        """Fetch (host tier or store), decode and cast on the CPU, charge the budget, place on the device.
        Settles ``entry`` as READY or FAILED; never raises an ``Exception``."""
        started = time.perf_counter()
        try:
            element_size = torch.empty((), dtype=self.dtype).element_size()
            self._check_fits(
                entry.record.num_virtual_tokens * self.geometry.bytes_per_virtual_token(element_size), entry
            )
            with self._lock:
                host_copy = self._host.get(entry.vkey)
                self._counts.host_hits += host_copy is not None
            if host_copy is None:
                with self._lock:
                    self._counts.store_reads += 1
            cpu = host_copy or fetch_prefix(
                self.store, entry.record, self.geometry, self.limits, self.dtype, self.encode_soft_prompt
            )
            self._charge(entry, cpu.nbytes)
            placed = place_prefix(cpu, self.device)
        except BaseException as exc:
            with self._room:
                entry.state, entry.error = LoadState.FAILED, exc
                self._residents.remove(entry)  # gives back any charge
                self._counts.load_failures += 1
                self._room.notify_all()
            entry.settled.set()
            if isinstance(exc, StoreUnavailable):
                self._health.mark_down(exc)
            if not isinstance(exc, Exception):
                raise
            return
        with self._room:
            if self._host.enabled:
                self._host.put(entry.vkey, cpu)
            entry.value, entry.state = placed, LoadState.READY
            self._latency.add(time.perf_counter() - started)
            if entry.stale and entry.pins == 0:  # superseded while loading, and nobody waits for it
                self._residents.remove(entry)
                self._counts.invalidations += 1
        entry.settled.set()

    def _charge(self, entry: CacheEntry, nbytes: int) -> None:
        """Charge the budget for ``entry``, evicting unpinned versions, waiting for pins to drop if allowed."""
        budget = self._residents.budget_bytes
        self._check_fits(nbytes, entry)
        deadline = time.monotonic() + self.cache_full_wait_s
        with self._room:
            while (evicted := self._residents.try_charge(entry, nbytes)) is None:
                remaining = deadline - time.monotonic()
                if remaining <= 0 or self._closed.is_set():
                    raise PrefixCacheFull(
                        f"the prefix cache is full: {self._residents.pinned_count} prefixes in use by running "
                        f"requests hold {self._residents.charged_bytes} of {budget} bytes; try again"
                    )
                self._room.wait(remaining)
            self._counts.evictions += len(evicted)

    def _check_fits(self, nbytes: int, entry: CacheEntry) -> None:
        if nbytes > self._residents.budget_bytes:
            raise PrefixCacheFull(
                f"{entry.record.task_id!r} (a {entry.record.kind} of {entry.record.bytes} stored bytes) needs "
                f"{nbytes} bytes, "
                f"more than the whole prefix cache ({self._residents.budget_bytes} bytes)"
            )

    # -- invalidation --------------------------------------------------------------------------------

    def _tracked(self) -> dict[TaskKey, str | None]:
        with self._lock:
            return {key: self._residents.latest_version(key) for key in self._residents.tracked_keys()}

    def _store_answered(self, failure: StoreUnavailable | None) -> None:
        if failure is None:
            self._health.mark_up()
        else:
            self._health.mark_down(failure)

    def _observe(self, key: TaskKey, version: str | None, deleted: bool = False) -> None:
        with self._room:
            warm = self._observe_locked(key, version, deleted=deleted, track=False)
            sticky = key in self._sticky
        if deleted and sticky:
            self._watcher.submit(self._set_sticky, key, None)
        elif warm and (self.prefetch_on_change or sticky):
            self._watcher.submit(self._prefetch, key)

    def _observe_locked(self, key: TaskKey, version: str | None, *, deleted: bool, track: bool) -> bool:
        removed, warm = self._residents.observe(key, version, deleted=deleted, track=track)
        if removed:
            self._counts.invalidations += len(removed)
            self._room.notify_all()
        return warm

    def _prefetch(self, key: TaskKey) -> None:
        """Load the new current version of a task that was resident, before a request asks for it."""
        try:
            record = self.store.head(*key)
        except PrefixStoreError:
            return  # the next acquire or reconcile will sort it out
        with self._room:
            self._observe_locked(key, record.version, deleted=False, track=True)
            if self._residents.latest_version(key) != record.version or self._residents.get(
                (record.tenant, record.task_id, record.version)
            ):
                entry = None
            else:
                entry = self._residents.add(record)
                self._counts.prefetches += 1
        if entry is not None:
            self._load(entry)
        with self._lock:
            sticky = self._sticky.get(key)
        if sticky is not None and sticky.record.version != record.version:
            with contextlib.suppress(PrefixStoreError):
                self._set_sticky(key, self.acquire(*key))

    def _set_sticky(self, key: TaskKey, handle: PrefixHandle | None) -> None:
        with self._lock:
            previous = self._sticky.pop(key, None)
            if handle is not None:
                self._sticky[key] = handle
        if previous is not None:
            self.release(previous)


def _own_copy(error: BaseException) -> BaseException:
    """A copy of a failed load's error for one waiter (threads must not raise one object together)."""
    try:
        return copy.copy(error)
    except Exception:
        return error
