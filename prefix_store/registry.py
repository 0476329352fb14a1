"""Device-resident prefixes, looked up by ``(tenant, task_id)`` and checked against the store's current version.

Every ``acquire`` reads the task's small record, so a request admitted after an upload's 2xx uses the
new version (hot swap); the blob is fetched and placed on the device only when that version is not
resident yet. Fetching (storage) and placing (device) are separate steps: they fail differently.
"""

from __future__ import annotations

import threading
from collections import OrderedDict
from dataclasses import dataclass

import torch

from prefix_store.geometry import ModelGeometry
from prefix_store.limits import PrefixLimits
from prefix_store.native_format import decode_native
from prefix_store.prefix import Prefix
from prefix_store.store import PrefixRecord, PrefixStore


@dataclass(frozen=True, eq=False)
class PrefixHandle:
    """A pinned prefix of one fixed version, on the device in the model dtype. Give it back with
    ``PrefixRegistry.release`` exactly once, however the request that holds it ends."""

    record: PrefixRecord
    prefix: Prefix


class PrefixRegistry:
    """Keeps recently used prefixes on the device, at most ``max_resident`` of them (least recently used go)."""

    def __init__(
        self,
        store: PrefixStore,
        geometry: ModelGeometry,
        *,
        device: torch.device,
        dtype: torch.dtype,
        limits: PrefixLimits,
        max_resident: int = 256,
    ) -> None:
        self.store = store
        self.geometry = geometry
        self.device = device
        self.dtype = dtype
        self.limits = limits
        self.max_resident = max_resident
        self._resident: OrderedDict[tuple[str, str], PrefixHandle] = OrderedDict()
        self._lock = threading.Lock()

    def acquire(self, tenant: str, task_id: str) -> PrefixHandle:
        """The task's current version, loading it if needed. Raises ``PrefixNotFound``, ``StoreUnavailable``."""
        record = self.store.head(tenant, task_id)
        key = (tenant, task_id)
        with self._lock:
            resident = self._resident.get(key)
            if resident is not None and resident.record.version == record.version:
                self._resident.move_to_end(key)
                return resident
        blob = self.store.get_blob(record)
        prefix = decode_native(blob, self.geometry, self.limits).to(self.device, self.dtype)
        resident = PrefixHandle(record, prefix)
        with self._lock:
            self._resident[key] = resident
            self._resident.move_to_end(key)
            while len(self._resident) > self.max_resident:
                self._resident.popitem(last=False)
        return resident

    def release(self, handle: PrefixHandle) -> None:
        """Unpin ``handle`` (this simple registry keeps no pin counts yet)."""

    def is_resident(self, record: PrefixRecord) -> bool:
        with self._lock:
            resident = self._resident.get((record.tenant, record.task_id))
            return resident is not None and resident.record.version == record.version

    def forget(self, tenant: str, task_id: str) -> None:
        """Drop a deleted task's prefix (requests already holding it finish on their reference)."""
        with self._lock:
            self._resident.pop((tenant, task_id), None)
