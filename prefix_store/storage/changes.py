"""The change feed of a store: who uploaded or deleted what, as hints for caches.

A feed is a fast path, never the source of truth: pub/sub delivers at most once and loses what was
sent while a subscriber was disconnected. A subscriber that may have missed events is told so
(``on_resync``) and must re-check what it caches; caches also re-check on a timer.
"""

from __future__ import annotations

import logging
import threading
from collections.abc import Callable
from dataclasses import dataclass

log = logging.getLogger(__name__)


@dataclass(frozen=True)
class ChangeEvent:
    """``task_id`` of ``tenant`` now has ``version`` as its current version, or (``deleted``) had it until
    it was deleted."""

    tenant: str
    task_id: str
    version: str
    deleted: bool = False

    def to_json(self) -> dict[str, object]:
        return {
            "tenant": self.tenant,
            "task_id": self.task_id,
            "version": self.version,
            "deleted": self.deleted,
        }

    @classmethod
    def from_json(cls, data: dict[str, object]) -> ChangeEvent:
        return cls(str(data["tenant"]), str(data["task_id"]), str(data["version"]), bool(data["deleted"]))


ChangeListener = Callable[[ChangeEvent], None]
ResyncListener = Callable[[], None]


class Subscription:
    """A live subscription to a change feed; ``close`` ends it (idempotent)."""

    def __init__(self, feed: ChangeFeed, on_change: ChangeListener, on_resync: ResyncListener | None) -> None:
        self._feed = feed
        self.on_change = on_change
        self.on_resync = on_resync

    def close(self) -> None:
        self._feed.remove(self)

    def __enter__(self) -> Subscription:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class ChangeFeed:
    """Fans events out to the listeners of one store object. Listeners run on the publishing thread (the
    writer's for local changes, the store's feed thread for remote ones): they must be quick and must not
    call back into the store. A listener that raises is logged and does not disturb the others."""

    def __init__(self) -> None:
        self._lock = threading.Lock()
        self._subscriptions: list[Subscription] = []

    def subscribe(self, on_change: ChangeListener, on_resync: ResyncListener | None = None) -> Subscription:
        subscription = Subscription(self, on_change, on_resync)
        with self._lock:
            self._subscriptions.append(subscription)
        return subscription

    def remove(self, subscription: Subscription) -> None:
        with self._lock:
            if subscription in self._subscriptions:
                self._subscriptions.remove(subscription)

    def publish(self, event: ChangeEvent) -> None:
        for subscription in self._snapshot():
            try:
                subscription.on_change(event)
            except Exception:
                log.exception("a change-feed listener failed on %s", event)

    def resync(self) -> None:
        """Tell every listener that events may have been lost (the feed connected or reconnected)."""
        for subscription in self._snapshot():
            if subscription.on_resync is None:
                continue
            try:
                subscription.on_resync()
            except Exception:
                log.exception("a change-feed listener failed to resync")

    def _snapshot(self) -> list[Subscription]:
        with self._lock:
            return list(self._subscriptions)
