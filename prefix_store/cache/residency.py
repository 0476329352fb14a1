"""The accounts of the device cache: which prefix versions are loading or resident, who pins them,
what they cost against the byte budget, their LRU order, and each task's latest known version.

Pure bookkeeping (no torch, no I/O, no locking): ``PrefixRegistry`` holds its lock around every call.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass, field
from enum import StrEnum

from prefix_store.soft_prompt import Resident
from prefix_store.storage.store import PrefixRecord, TaskKey, version_sequence

VersionKey = tuple[str, str, str]  # (tenant, task_id, version)


class LoadState(StrEnum):
    """Lifecycle of one cached prefix version."""

    LOADING = "loading"  # being fetched and placed; other acquirers of this version wait (single flight)
    READY = "ready"  # on the device, in the model dtype
    FAILED = "failed"  # the load failed; the entry has left the cache and its waiters get the error


@dataclass(eq=False)
class CacheEntry:
    """One version of one task's prefix in the cache."""

    record: PrefixRecord
    state: LoadState = LoadState.LOADING
    value: Resident | None = None  # on the device once READY
    nbytes: int = 0  # device bytes charged to the budget (charged before placement)
    pins: int = 0  # handles given out, plus acquirers waiting for the load
    stale: bool = False  # no longer the task's current version: dropped as soon as unpinned
    error: BaseException | None = None  # why the load failed (FAILED)
    settled: threading.Event = field(default_factory=threading.Event)  # set on READY or FAILED

    @property
    def vkey(self) -> VersionKey:
        return (self.record.tenant, self.record.task_id, self.record.version)

    @property
    def evictable(self) -> bool:
        return self.state is LoadState.READY and self.pins == 0


class ResidentSet:
    """Entries by version, in LRU order (least recently used first), charged against ``budget_bytes``."""

    def __init__(self, budget_bytes: int) -> None:
        if budget_bytes < 1:
            raise ValueError(f"the prefix cache budget must be positive, got {budget_bytes}")
        self.budget_bytes = budget_bytes
        self.charged_bytes = 0  # resident, or reserved for a placement in progress
        self.peak_bytes = 0
        self._entries: OrderedDict[VersionKey, CacheEntry] = OrderedDict()
        self._by_task: dict[TaskKey, dict[str, CacheEntry]] = {}
        self._latest: dict[TaskKey, str] = {}  # current version as last seen, for tasks with entries

    def get(self, vkey: VersionKey) -> CacheEntry | None:
        return self._entries.get(vkey)

    def add(self, record: PrefixRecord) -> CacheEntry:
        """A new LOADING entry; stale from the start if a newer version of the task is known."""
        entry = CacheEntry(record)
        latest = self._latest.setdefault(record.key, record.version)
        entry.stale = latest != record.version
        self._entries[entry.vkey] = entry
        self._by_task.setdefault(record.key, {})[record.version] = entry
        return entry

    def touch(self, entry: CacheEntry) -> None:
        self._entries.move_to_end(entry.vkey)

    def remove(self, entry: CacheEntry) -> None:
        if self._entries.pop(entry.vkey, None) is None:
            return
        self.charged_bytes -= entry.nbytes
        versions = self._by_task[entry.record.key]
        del versions[entry.record.version]
        if not versions:
            del self._by_task[entry.record.key]
            self._latest.pop(entry.record.key, None)

    def try_charge(self, entry: CacheEntry, nbytes: int) -> list[CacheEntry] | None:
        """Charge ``nbytes`` for ``entry``, evicting unpinned resident entries (least recently used first)
        as needed. Returns the evicted entries, or ``None`` (and evicts nothing) if it cannot fit."""
        excess = self.charged_bytes + nbytes - self.budget_bytes
        victims: list[CacheEntry] = []
        if excess > 0:
            freed = 0
            for candidate in sorted(
                self._entries.values(), key=lambda e: not e.stale
            ):  # stale first, then LRU
                if candidate.evictable:
                    victims.append(candidate)
                    freed += candidate.nbytes
                    if freed >= excess:
                        break
            if freed < excess:
                return None
        for victim in victims:
            self.remove(victim)
        entry.nbytes = nbytes
        self.charged_bytes += nbytes
        self.peak_bytes = max(self.peak_bytes, self.charged_bytes)
        return victims

    def observe(
        self, key: TaskKey, version: str | None, *, deleted: bool = False, track: bool = True
    ) -> tuple[list[CacheEntry], bool]:
        """Learn the task's current ``version``, or that it was deleted (``version``: the deleted one, or
        ``None`` if unknown). Older news than what is known is ignored; news of a task without entries
        is ignored unless ``track``. Marks other versions stale and removes the unpinned resident ones.

        Returns the removed entries and whether the task was warm (its previous current version was
        resident), a hint to load the new version before anyone asks.
        """
        known = self._latest.get(key)
        if version is not None and known is not None and version_sequence(version) < version_sequence(known):
            return [], False
        if not deleted and known == version:
            return [], False
        versions = self._by_task.get(key, {})
        if not versions and not track:
            return [], False
        warm = known is not None and (old := versions.get(known)) is not None and old.state is LoadState.READY
        removed: list[CacheEntry] = []
        for entry in list(versions.values()):
            if deleted or entry.record.version != version:
                entry.stale = True
                if entry.evictable:
                    self.remove(entry)  # forgets the task if it was its last entry: set _latest after
                    removed.append(entry)
        if deleted or (not track and key not in self._by_task):
            self._latest.pop(key, None)  # nothing cached of it any more: stop tracking it
        else:
            assert version is not None
            self._latest[key] = version
        return removed, warm and not deleted

    def latest_ready(self, key: TaskKey) -> CacheEntry | None:
        """The resident entry of the task's latest known version, if any."""
        version = self._latest.get(key)
        entry = self._by_task.get(key, {}).get(version) if version is not None else None
        return entry if entry is not None and entry.state is LoadState.READY else None

    def latest_version(self, key: TaskKey) -> str | None:
        return self._latest.get(key)

    def tracked_keys(self) -> list[TaskKey]:
        """Tasks whose current version is cached or loading (what a reconcile must re-check)."""
        return list(self._latest)

    def entries(self) -> list[CacheEntry]:
        return list(self._entries.values())

    @property
    def resident_count(self) -> int:
        return sum(1 for e in self._entries.values() if e.state is LoadState.READY)

    @property
    def pinned_count(self) -> int:
        return sum(1 for e in self._entries.values() if e.pins > 0 and e.state is LoadState.READY)
