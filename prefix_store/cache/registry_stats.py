"""Counters of the prefix registry, for metrics, and its view of the store's health."""

from __future__ import annotations

import logging
import statistics
import time
from collections import deque
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class LatencySummary:
    """Load latency (store or host tier → device), over all loads (count, total) and the recent ones."""

    count: int
    total_s: float
    p50_s: float
    p99_s: float
    max_s: float


@dataclass(frozen=True)
class RegistryStats:
    hits: int  # acquires served by a resident version
    misses: int  # acquires that started a load (one per load, however many acquirers waited for it)
    coalesced: int  # acquires that waited for a load another acquire had started
    host_hits: int  # loads served by the host tier instead of the store
    store_reads: int  # blobs read from the store (request loads and prefetches)
    prefetches: int  # loads started by a change of version, not by a request
    evictions: int  # unpinned versions evicted from the device to make room (LRU)
    invalidations: int  # versions dropped because a newer version or a delete was seen
    load_failures: int  # loads that failed (store, validation, no room)
    served_during_outage: int  # acquires answered from a resident version while the store was down
    resident_bytes: int  # device bytes charged: resident versions and placements in progress
    peak_resident_bytes: int  # the most ever charged; never above budget_bytes
    budget_bytes: int
    resident_count: int  # versions on the device
    pinned_count: int  # versions on the device with at least one pin
    host_bytes: int
    host_budget_bytes: int
    host_evictions: int
    store_available: bool
    load_latency: LatencySummary


@dataclass
class Counters:
    """The registry's running counts (the first fields of ``RegistryStats``), updated under its lock."""

    hits: int = 0
    misses: int = 0
    coalesced: int = 0
    host_hits: int = 0
    store_reads: int = 0
    prefetches: int = 0
    evictions: int = 0
    invalidations: int = 0
    load_failures: int = 0
    served_during_outage: int = 0


class LatencyWindow:
    """All-time count and sum, percentiles over the last ``size`` samples."""

    def __init__(self, size: int = 2048) -> None:
        self._recent: deque[float] = deque(maxlen=size)
        self.count = 0
        self.total = 0.0
        self.max = 0.0

    def add(self, seconds: float) -> None:
        self._recent.append(seconds)
        self.count += 1
        self.total += seconds
        self.max = max(self.max, seconds)

    def summary(self) -> LatencySummary:
        if len(self._recent) < 2:
            only = self._recent[0] if self._recent else 0.0
            return LatencySummary(self.count, self.total, only, only, self.max)
        cuts = statistics.quantiles(self._recent, n=100, method="inclusive")
        return LatencySummary(self.count, self.total, cuts[49], cuts[98], self.max)


class StoreHealth:
    """Whether the store answered lately. After a failure, callers skip the store for ``retry_after_s``
    (resident prefixes are served, cold loads fail at once) instead of each paying a timeout."""

    def __init__(self, retry_after_s: float) -> None:
        self.retry_after_s = retry_after_s
        self.available = True
        self._down_until = 0.0

    def should_try(self) -> bool:
        return self.available or time.monotonic() >= self._down_until

    def mark_down(self, reason: object) -> None:
        if self.available:
            log.warning("prefix store unavailable (%s): serving resident prefixes only", reason)
        self.available = False
        self._down_until = time.monotonic() + self.retry_after_s

    def mark_up(self) -> None:
        if not self.available:
            log.warning("prefix store available again")
        self.available = True
