"""The storage interface: versioned prefix records per ``(tenant, task_id)`` over content-addressed blobs.

Every backend keeps the same contract (``tests/prefix_store/test_store_contract.py`` runs against each):

- a blob (a validated native prefix file) is stored under its sha256 and written *before* the small
  record that names it, so a crash leaves the old version or the new one, never a torn one;
- a record names a task's current version; versions are ``"<sequence>-<sha256[:12]>"`` with a
  sequence that grows with every upload of the task, deletes included (so versions are never reused);
- a blob no record references any more is garbage-collected after a grace period, long enough for a
  reader that has just read the old record to fetch its blob;
- tenant and task names are validated before any I/O (``names.py``): they are names, never paths;
- every change is published on the store's change feed (``subscribe``), a hint for caches.
"""

from __future__ import annotations

import abc
import builtins
from collections.abc import Collection, Iterable
from dataclasses import dataclass
from urllib.parse import unquote, urlparse

from prefix_store.errors import PrefixNotFound, QuotaExceeded, StoreUnavailable, VersionMismatch
from prefix_store.storage.changes import ChangeEvent, ChangeFeed, ChangeListener, ResyncListener, Subscription
from prefix_store.storage.excerpt import excerpt
from prefix_store.storage.names import validate_task_id, validate_tenant

DEFAULT_PAGE_SIZE = 100
MAX_PAGE_SIZE = 1000


TaskKey = tuple[str, str]  # (tenant, task_id)
ANY_VERSION = "*"  # as ``if_match``: whichever version is current (the task must exist)
_SHOWN_VERSIONS = 3  # a failed precondition's message quotes this many of the versions it named


@dataclass(frozen=True)
class PrefixRecord:
    """The small record naming a task's current version; the blob it points at is a native prefix file."""

    tenant: str
    task_id: str
    version: str  # "<sequence>-<sha256 prefix>": new on every upload, stable for the blob it names
    sha256: str  # of the native blob
    num_virtual_tokens: int
    bytes: int  # size of the native blob
    created_at: float  # unix seconds
    source_format: str  # "native" or "peft": what the uploader sent
    kind: str = "prefix"  # "prefix", "soft_prompt" or "lora": what the blob holds (records from before: none)

    @property
    def key(self) -> TaskKey:
        return (self.tenant, self.task_id)

    @property
    def sequence(self) -> int:
        return version_sequence(self.version)

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PrefixRecord:
        return cls(
            tenant=str(data["tenant"]),
            task_id=str(data["task_id"]),
            version=str(data["version"]),
            sha256=str(data["sha256"]),
            num_virtual_tokens=int(data["num_virtual_tokens"]),  # type: ignore[call-overload]
            bytes=int(data["bytes"]),  # type: ignore[call-overload]
            created_at=float(data["created_at"]),  # type: ignore[arg-type]
            source_format=str(data["source_format"]),
            kind=str(data.get("kind", "prefix")),
        )


@dataclass(frozen=True)
class RecordPage:
    """One page of a tenant's records, sorted by task id; pass ``next_cursor`` to get the next page
    (``None``: this was the last one)."""

    records: list[PrefixRecord]
    next_cursor: str | None


@dataclass(frozen=True)
class Quota:
    """What one tenant may hold: current versions (tasks) and their bytes together; None: no limit. A
    write is refused only where it would grow a figure past its limit (a replace by a smaller blob is
    not, even over a lowered limit)."""

    max_prefixes: int | None = None
    max_bytes: int | None = None

    def check(self, before: TenantUsage, after: TenantUsage) -> None:
        """Raise ``QuotaExceeded`` unless the change ``before`` → ``after`` stays within the quota."""
        for what, limit, old, new in (
            ("prefixes", self.max_prefixes, before.prefixes, after.prefixes),
            ("bytes", self.max_bytes, before.bytes, after.bytes),
        ):
            if limit is not None and new > limit and new > old:
                raise QuotaExceeded(what, limit, old)


@dataclass(frozen=True)
class TenantUsage:
    """What one tenant holds: its current versions and their bytes, kept by the store with every write."""

    prefixes: int
    bytes: int

    def replaced(self, previous: PrefixRecord | None, new_bytes: int) -> TenantUsage:
        """After a put of ``new_bytes`` over ``previous`` (None: a new task)."""
        old_bytes = previous.bytes if previous is not None else 0
        return TenantUsage(self.prefixes + (previous is None), self.bytes - old_bytes + new_bytes)

    def removed(self, record: PrefixRecord) -> TenantUsage:
        """After ``record``'s task was deleted."""
        return TenantUsage(self.prefixes - 1, self.bytes - record.bytes)


@dataclass(frozen=True)
class Precondition:
    """What a write requires of the task's current version. Each backend checks it inside the write's
    atomic step, so no other writer can change the task between the check and the write."""

    versions: frozenset[str] | None = None  # the current version must be one of these; None: any
    exists: bool | None = None  # True: the task must exist; False: it must not; None: either

    @classmethod
    def of(cls, if_match: str | Collection[str] | None, if_absent: bool = False) -> Precondition | None:
        """The precondition of ``put``'s and ``delete``'s arguments (None: there is none).

        ``if_match``: a version, ``ANY_VERSION`` (the task must exist) or a collection of versions (one of
        them must be current; an empty one never matches). ``if_absent``: the task must not exist.
        """
        if if_match is not None and if_absent:
            raise ValueError("if_match and if_absent exclude each other: give one of them")
        if if_absent:
            return cls(exists=False)
        if if_match is None:
            return None
        if if_match == ANY_VERSION:
            return cls(exists=True)
        return cls(versions=frozenset([if_match] if isinstance(if_match, str) else if_match))

    def holds(self, current: str | None) -> bool:
        """Whether a task whose current version is ``current`` (None: it does not exist) meets it."""
        if self.exists is not None and self.exists != (current is not None):
            return False
        return self.versions is None or current in self.versions

    def mismatch(self, current: str | None) -> VersionMismatch:
        """The error of a write this precondition refused; it quotes at most an excerpt of each version
        it named (they come from callers)."""
        if self.exists is False:
            return VersionMismatch(
                f"If-None-Match * allows only a new task, and the task exists (version {current})"
            )
        if self.exists is True:
            return VersionMismatch("If-Match * needs a current version, and the task does not exist")
        named = sorted(self.versions or ())
        shown = ", ".join(excerpt(version) for version in named[:_SHOWN_VERSIONS])
        if len(named) > _SHOWN_VERSIONS:
            shown += f", … ({len(named)} versions)"
        return VersionMismatch(
            f"If-Match {shown or '(no version)'} does not match the current version ({current or 'none'})"
        )


def version_sequence(version: str) -> int:
    """The upload sequence number a version starts with (versions of one task are ordered by it)."""
    head, _, _ = version.partition("-")
    return int(head) if head.isdigit() else -1


def make_version(sequence: int, sha256: str) -> str:
    return f"{sequence}-{sha256[:12]}"


def check_page_args(tenant: str, cursor: str | None, limit: int) -> None:
    """Validate the arguments of ``list_page`` (before any I/O)."""
    validate_tenant(tenant)
    if cursor is not None:
        validate_task_id(cursor)  # a cursor is the last task id of the previous page
    if not 1 <= limit <= MAX_PAGE_SIZE:
        raise ValueError(f"limit must be between 1 and {MAX_PAGE_SIZE}, got {limit}")


class PrefixStore(abc.ABC):
    """Where prefixes live. Thread-safe; several processes may share one backend.

    Errors: ``PrefixNotFound``, ``VersionMismatch``, ``StoreUnavailable`` (transport or backend failure,
    already retried where retrying is safe), ``InvalidName``; nothing foreign leaks out.
    """

    def __init__(self) -> None:
        self._changes = ChangeFeed()

    @abc.abstractmethod
    def put(
        self,
        tenant: str,
        task_id: str,
        blob: bytes,
        *,
        num_virtual_tokens: int,
        source_format: str,
        kind: str = "prefix",
        if_match: str | Collection[str] | None = None,
        if_absent: bool = False,
        quota: Quota | None = None,
    ) -> tuple[PrefixRecord, bool]:
        """Store ``blob`` (a validated native prefix or soft prompt, of ``kind``) as the task's new current
        version, atomically.

        Returns the new record and whether it replaced an earlier version. Raises ``VersionMismatch``,
        storing nothing, when ``if_match`` is given and does not name the current version (a version,
        ``ANY_VERSION`` or a collection of versions, see ``Precondition.of``), or when ``if_absent`` is
        set and the task exists; ``QuotaExceeded``, storing nothing, when the tenant's usage after the
        write would pass ``quota`` (checked in the same atomic step as the write, so concurrent writers,
        in this process or others sharing the backend, never pass it together). Once this returns the
        upload is durable (as durable as the backend is configured to be) and visible to every reader.
        """

    @abc.abstractmethod
    def head(self, tenant: str, task_id: str) -> PrefixRecord:
        """The current record; raises ``PrefixNotFound``."""

    @abc.abstractmethod
    def get_blob(self, record: PrefixRecord) -> bytes:
        """The native prefix bytes a record names; raises ``PrefixNotFound`` once the blob is collected."""

    @abc.abstractmethod
    def list_page(
        self, tenant: str, *, cursor: str | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> RecordPage:
        """Up to ``limit`` current records of one tenant with task ids after ``cursor``, sorted by task id."""

    @abc.abstractmethod
    def usage(self, tenant: str) -> TenantUsage:
        """The tenant's current versions and their bytes, as the store keeps them with every write (no
        listing; rebuilt from the records once if the store has none, e.g. a store from an older release
        or a crash between a write and its count)."""

    @abc.abstractmethod
    def delete(self, tenant: str, task_id: str, *, if_match: str | Collection[str] | None = None) -> None:
        """Remove the task; raises ``PrefixNotFound``, or ``VersionMismatch`` when ``if_match`` (as for
        ``put``) does not name the current version, a task that does not exist included."""

    def get(self, tenant: str, task_id: str, version: str | None = None) -> tuple[PrefixRecord, bytes]:
        """The record and bytes of the current version, read consistently.

        With ``version``, that version, which must still be current (only the current version is
        kept): otherwise ``PrefixNotFound``.
        """
        for _ in range(3):
            record = self.head(tenant, task_id)
            if version is not None and record.version != version:
                raise PrefixNotFound(f"version {excerpt(version)} of {task_id!r} is not its current version")
            try:
                return record, self.get_blob(record)
            except PrefixNotFound:
                continue  # replaced (and its blob collected) between the two reads: read again
        raise StoreUnavailable(f"{task_id!r} keeps changing under the reader; try again")

    def list(self, tenant: str) -> builtins.list[PrefixRecord]:
        """Every current record of one tenant, sorted by task id (all pages)."""
        records: builtins.list[PrefixRecord] = []
        cursor: str | None = None
        while True:
            page = self.list_page(tenant, cursor=cursor, limit=MAX_PAGE_SIZE)
            records.extend(page.records)
            if page.next_cursor is None:
                return records
            cursor = page.next_cursor

    def head_many(self, keys: Iterable[TaskKey]) -> dict[TaskKey, PrefixRecord | None]:
        """The current record of each ``(tenant, task_id)``, ``None`` for those that do not exist."""
        found: dict[TaskKey, PrefixRecord | None] = {}
        for tenant, task_id in keys:
            try:
                found[(tenant, task_id)] = self.head(tenant, task_id)
            except PrefixNotFound:
                found[(tenant, task_id)] = None
        return found

    def subscribe(
        self, on_change: ChangeListener, *, on_resync: ResyncListener | None = None
    ) -> Subscription:
        """Call ``on_change`` for every change this store object makes or (shared backends) hears of.

        At most once, on a store-owned thread. ``on_resync`` is called when events may have been lost
        (the feed connected or reconnected): re-check whatever you cache.
        """
        subscription = self._changes.subscribe(on_change, on_resync)
        self._start_feed()
        return subscription

    def collect_garbage(self) -> int:
        """Remove blobs no record has referenced for the grace period; return how many went.

        Backends also collect on their own; this runs a collection now."""
        return 0

    def ping(self) -> None:  # noqa: B027 - optional for backends that are always there
        """Raise ``StoreUnavailable`` if the backend cannot answer."""

    def close(self) -> None:  # noqa: B027 - optional for backends that hold nothing
        """Release connections and threads. The store must not be used afterwards."""

    def __enter__(self) -> PrefixStore:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()

    def _publish(self, event: ChangeEvent) -> None:
        """Deliver a change this store object made to its own subscribers, before the write returns."""
        self._changes.publish(event)

    def _start_feed(self) -> None:  # noqa: B027 - backends shared between processes override it
        """Start listening for other processes' changes (backends that can hear them)."""


def open_store(url: str, **options: object) -> PrefixStore:
    """Build a store from its URL.

    - ``file:///abs/path``: ``FileStore`` (embedded, shared by processes of one machine);
    - ``redis://[[user]:password@]host:port/db``, ``rediss://…`` (TLS), ``unix:///path?db=0``:
      ``RedisStore``; query options as redis-py's ``from_url`` takes them (``socket_timeout``,
      ``ssl_ca_certs``, …), plus ``namespace`` (key prefix, default ``prefix-serve``).

    ``options`` go to the backend's constructor.
    """
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from prefix_store.storage.filesystem import FileStore

        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"a file store URL is file:///absolute/path, got {url!r}")
        return FileStore(unquote(parsed.path), **options)  # type: ignore[arg-type]
    if parsed.scheme in ("redis", "rediss", "unix"):
        from prefix_store.storage.redis_store import RedisStore

        return RedisStore(url, **options)  # type: ignore[arg-type]
    raise ValueError(
        f"unsupported store URL scheme {parsed.scheme!r}: use file:///abs/path or redis://host:port/db"
    )
