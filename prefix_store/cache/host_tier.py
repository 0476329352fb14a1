"""The optional host-memory tier: decoded prefixes kept in CPU memory, in the model dtype, so a version
evicted from the device comes back with one copy instead of a store read and a decode.

Inclusive of the device cache (every loaded version is offered to it), LRU within its own byte budget.
Not thread-safe: ``PrefixRegistry`` holds its lock around every call.
"""

from __future__ import annotations

from collections import OrderedDict

from prefix_store.cache.residency import VersionKey
from prefix_store.soft_prompt import Resident


class HostTier:
    def __init__(self, budget_bytes: int) -> None:
        self.budget_bytes = max(0, budget_bytes)
        self.bytes = 0
        self.evictions = 0
        self._prefixes: OrderedDict[VersionKey, Resident] = OrderedDict()

    @property
    def enabled(self) -> bool:
        return self.budget_bytes > 0

    def get(self, vkey: VersionKey) -> Resident | None:
        prefix = self._prefixes.get(vkey)
        if prefix is not None:
            self._prefixes.move_to_end(vkey)
        return prefix

    def put(self, vkey: VersionKey, prefix: Resident) -> None:
        """Keep ``prefix`` if it fits in the budget, evicting least recently used ones."""
        if prefix.nbytes > self.budget_bytes or vkey in self._prefixes:
            return
        while self.bytes + prefix.nbytes > self.budget_bytes:
            _, evicted = self._prefixes.popitem(last=False)
            self.bytes -= evicted.nbytes
            self.evictions += 1
        self._prefixes[vkey] = prefix
        self.bytes += prefix.nbytes

    def discard(self, vkey: VersionKey) -> None:
        prefix = self._prefixes.pop(vkey, None)
        if prefix is not None:
            self.bytes -= prefix.nbytes
