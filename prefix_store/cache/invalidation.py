"""How a registry learns that cached versions went stale: the store's change feed (fast, at most once)
and a periodic reconcile (slow, certain), run at once when the feed (re)connects, since events sent
while it was away are lost. What to do about a change is the registry's business (``on_version``)."""

from __future__ import annotations

import contextlib
import logging
import threading
from collections.abc import Callable
from concurrent.futures import Future, ThreadPoolExecutor

from prefix_store.errors import StoreUnavailable
from prefix_store.storage.changes import ChangeEvent
from prefix_store.storage.store import PrefixStore, TaskKey

log = logging.getLogger(__name__)

VersionListener = Callable[[TaskKey, "str | None", bool], None]  # (task, version, deleted)


class VersionWatcher:
    """Feeds ``on_version`` from the change feed and from a reconcile of ``tracked()`` every
    ``interval_s`` (``None``: only when the feed reconnects or ``reconcile`` is called). Reports the
    store's health through ``on_store``. Also runs the registry's background work (prefetches)."""

    def __init__(
        self,
        store: PrefixStore,
        *,
        tracked: Callable[[], dict[TaskKey, str | None]],
        on_version: VersionListener,
        on_store: Callable[[StoreUnavailable | None], None],
        store_is_down: Callable[[], bool],
        interval_s: float | None,
    ) -> None:
        self.store = store
        self.interval_s = interval_s
        self._tracked = tracked
        self._on_version = on_version
        self._on_store = on_store
        self._store_is_down = store_is_down
        self._closed = threading.Event()
        self._wake = threading.Event()
        self._background = ThreadPoolExecutor(max_workers=2, thread_name_prefix="prefix-prefetch")
        self._subscription = store.subscribe(self._on_change, on_resync=self._wake.set)
        self._thread = threading.Thread(target=self._run, name="prefix-reconcile", daemon=True)
        self._thread.start()

    def reconcile(self) -> None:
        """Re-check every tracked task against the store now."""
        known = self._tracked()
        try:
            if known:
                records = self.store.head_many(known)
            elif self._store_is_down():
                self.store.ping()  # nothing to check, but someone must notice the store is back
                records = {}
            else:
                return
        except StoreUnavailable as exc:
            self._on_store(exc)
            return
        self._on_store(None)
        for key, record in records.items():
            if record is not None:
                self._on_version(key, record.version, False)
            else:  # deleted after we learnt known[key]; a newer upload since then outranks this
                self._on_version(key, known[key], True)

    def submit(self, work: Callable[..., None], *args: object) -> None:
        """Run ``work(*args)`` on a background thread (dropped once closed); failures are logged."""
        if self._closed.is_set():
            return
        with contextlib.suppress(RuntimeError):  # shut down meanwhile
            self._background.submit(work, *args).add_done_callback(_log_failure)

    def close(self) -> None:
        self._closed.set()
        self._wake.set()
        self._subscription.close()
        self._thread.join(timeout=5)
        self._background.shutdown(wait=True, cancel_futures=True)

    def _on_change(self, event: ChangeEvent) -> None:
        self._on_version((event.tenant, event.task_id), event.version, event.deleted)

    def _run(self) -> None:
        while not self._closed.is_set():
            self._wake.wait(self.interval_s)
            self._wake.clear()
            if self._closed.is_set():
                return
            try:
                self.reconcile()
            except Exception:
                log.exception("prefix registry: reconcile failed")


def _log_failure(future: Future[None]) -> None:
    if not future.cancelled() and (exc := future.exception()) is not None:
        log.error("prefix registry: background work failed", exc_info=exc)
