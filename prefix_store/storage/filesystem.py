"""The filesystem store (embedded default): ``file:///abs/path``.

Layout under the root, built only from validated names:

    blobs/<sha256[:2]>/<sha256>.safetensors     content-addressed native prefix files
    tenants/<tenant>/<task_id>.json             the record naming a task's current version
    tenants/<tenant>/<task_id>.deleted          tombstone of a deleted task (keeps its sequence going)
    locks/<tenant>.<task_id>.lock               per-task writer lock (flock)
    locks/<tenant>.usage-lock                   per-tenant lock of its usage (flock)
    locks/gc.lock, locks/gc.stamp               writers (shared) vs the blob collector (exclusive)
    usage/<tenant>.json                         the tenant's count and bytes, and the write in progress

Every file is written to a temporary name, fsynced, renamed into place, and its folder fsynced, so an
acknowledged upload survives a crash and a crash never leaves a torn file: it leaves the old record
(and perhaps an orphan blob or temporary file, which the collector removes). Writers of one task
serialise on a lock; writers hold the collector's lock shared from writing the blob to writing the
record, so a blob a writer is about to reference is never collected. A tenant's usage (its tasks and
their bytes, what its quota is checked against) is kept in one small file, updated under the tenant's
lock in the same critical section as the record: the new figures are written first, with the write in
progress and the figures before it, then the record; whoever reads the usage next settles it by looking
at that one record (written: the new figures hold; not: the old ones), so a crash between the two steps
never leaves a wrong count, and a missing file is rebuilt from the records. Several processes may share the
folder; the change feed reaches only this process's subscribers (other processes' caches notice
changes by re-checking, see ``PrefixRegistry``).
"""

from __future__ import annotations

import bisect
import contextlib
import fcntl
import hashlib
import json
import logging
import os
import tempfile
import threading
import time
from collections.abc import Collection, Iterator
from pathlib import Path

from prefix_store.errors import PrefixNotFound, StoreUnavailable
from prefix_store.storage.changes import ChangeEvent
from prefix_store.storage.names import validate_task_id, validate_tenant
from prefix_store.storage.store import (
    DEFAULT_PAGE_SIZE,
    Precondition,
    PrefixRecord,
    PrefixStore,
    Quota,
    RecordPage,
    TenantUsage,
    check_page_args,
    make_version,
)

log = logging.getLogger(__name__)

_RECORD, _TOMBSTONE, _BLOB = ".json", ".deleted", ".safetensors"
_MTIME_TICK_S = 0.1  # more than the kernel's coarse clock tick that stamps a folder's mtime


class FileStore(PrefixStore):
    """Prefixes in a folder. ``gc_grace_s``: how long a blob stays after the last record referencing it
    went; ``gc_interval_s``: how often writes start a background collection (``None``: only when
    ``collect_garbage`` is called)."""

    def __init__(
        self, root: str | Path, *, gc_grace_s: float = 300.0, gc_interval_s: float | None = 300.0
    ) -> None:
        super().__init__()
        self.root = Path(root)
        self.gc_grace_s = gc_grace_s
        self.gc_interval_s = gc_interval_s
        self._gc_running = threading.Lock()
        self._listings: dict[Path, tuple[float, list[str]]] = {}  # folder -> (its mtime, task ids)
        self._listing_lock = threading.Lock()
        try:
            for folder in (self.root / name for name in ("blobs", "tenants", "locks", "usage")):
                folder.mkdir(parents=True, exist_ok=True)
        except OSError as exc:
            raise StoreUnavailable(f"cannot create the prefix store folder: {exc.strerror}") from None

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
        record_path = self._record_path(tenant, task_id)
        precondition = Precondition.of(if_match, if_absent)
        sha256 = hashlib.sha256(blob).hexdigest()
        with _os_errors("store a prefix"), self._task_lock(tenant, task_id), self._gc_lock(shared=True):
            previous = self._read_record(record_path)
            _check_precondition(previous, precondition)
            blob_path = self._blob_path(sha256)
            if blob_path.exists():
                os.utime(blob_path)  # referenced again: restart its grace period
            else:
                _atomic_write(blob_path, blob)
            last = previous or self._read_record(record_path.with_suffix(_TOMBSTONE))
            record = PrefixRecord(
                tenant=tenant,
                task_id=task_id,
                version=make_version((last.sequence if last else 0) + 1, sha256),
                sha256=sha256,
                num_virtual_tokens=num_virtual_tokens,
                bytes=len(blob),
                created_at=time.time(),
                source_format=source_format,
                kind=kind,
            )
            with self._usage_lock(tenant):
                usage = self._settled_usage(tenant)
                after = usage.replaced(previous, len(blob))
                if quota is not None:
                    quota.check(usage, after)
                self._write_usage(tenant, after, pending=(task_id, record.version, usage))
                _atomic_write(record_path, json.dumps(record.to_json()).encode())
            if previous is not None and previous.sha256 != sha256:
                self._unreferenced(previous.sha256)
        self._publish(ChangeEvent(tenant, task_id, record.version))
        self._maybe_collect_garbage()
        return record, previous is not None

    def head(self, tenant: str, task_id: str) -> PrefixRecord:
        record = self._read_record(self._record_path(tenant, task_id))
        if record is None:
            raise PrefixNotFound(f"no prefix named {task_id!r}", name=task_id)
        return record

    def get_blob(self, record: PrefixRecord) -> bytes:
        path = self._blob_path(record.sha256)
        try:
            return path.read_bytes()
        except FileNotFoundError:
            raise PrefixNotFound(f"the blob of {record.task_id!r} version {record.version} is gone") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read a prefix blob: {exc.strerror}") from None

    def list_page(
        self, tenant: str, *, cursor: str | None = None, limit: int = DEFAULT_PAGE_SIZE
    ) -> RecordPage:
        check_page_args(tenant, cursor, limit)
        folder = self.root / "tenants" / tenant
        with _os_errors("list prefixes"):
            names = self._task_names(folder)
        records: list[PrefixRecord] = []
        for task_id in names[bisect.bisect_right(names, cursor) if cursor is not None else 0 :]:
            record = self._read_record(folder / f"{task_id}{_RECORD}")
            if record is None:
                continue  # deleted since the listing
            if len(records) == limit:
                return RecordPage(records, records[-1].task_id)
            records.append(record)
        return RecordPage(records, None)

    def _task_names(self, folder: Path) -> list[str]:
        """The task ids a tenant's folder holds records of, sorted. Kept from the last listing while the
        folder has not changed since (its mtime, which every record created, replaced or deleted moves),
        so the pages of a walk over a tenant of 10,000 tasks cost what a page costs; a listing made within
        ``_MTIME_TICK_S`` of the folder's last change is not kept, as a change in the same clock tick
        would leave the mtime as it was."""
        try:
            changed = folder.stat().st_mtime
        except FileNotFoundError:
            return []
        with self._listing_lock:
            kept = self._listings.get(folder)
        if kept is not None and kept[0] == changed:
            return kept[1]
        listed_at = time.time()
        names = sorted(n[: -len(_RECORD)] for n in os.listdir(folder) if n.endswith(_RECORD))
        if listed_at > changed + _MTIME_TICK_S:
            with self._listing_lock:
                self._listings[folder] = (changed, names)
        return names

    def delete(self, tenant: str, task_id: str, *, if_match: str | Collection[str] | None = None) -> None:
        record_path = self._record_path(tenant, task_id)
        precondition = Precondition.of(if_match)
        # the collector's lock, shared: it removes temporary files, and this writes the usage through one
        with _os_errors("delete a prefix"), self._task_lock(tenant, task_id), self._gc_lock(shared=True):
            record = self._read_record(record_path)
            _check_precondition(record, precondition)
            if record is None:
                raise PrefixNotFound(f"no prefix named {task_id!r}", name=task_id)
            with self._usage_lock(tenant):
                usage = self._settled_usage(tenant)
                self._write_usage(tenant, usage.removed(record), pending=(task_id, None, usage))
                os.replace(record_path, record_path.with_suffix(_TOMBSTONE))  # one atomic step
                _fsync_folder(record_path.parent)
            self._unreferenced(record.sha256)
        self._publish(ChangeEvent(tenant, task_id, record.version, deleted=True))
        self._maybe_collect_garbage()

    def usage(self, tenant: str) -> TenantUsage:
        with _os_errors("read a tenant's usage"), self._usage_lock(tenant):
            return self._settled_usage(tenant)

    def collect_garbage(self) -> int:
        """Remove blobs unreferenced for ``gc_grace_s`` and temporary files of crashed writers."""
        with _os_errors("collect garbage"), self._gc_lock(shared=False):
            # No writer is between writing a blob and writing its record while we hold the lock.
            referenced = self._referenced_blobs()
            cutoff = time.time() - self.gc_grace_s
            removed = 0
            for path in (self.root / "blobs").glob(f"*/*{_BLOB}"):
                with contextlib.suppress(FileNotFoundError):
                    if path.stem not in referenced and path.stat().st_mtime <= cutoff:
                        path.unlink()
                        removed += 1
            for pattern in (".*.tmp", "*/.*.tmp", "*/*/.*.tmp"):
                for temp in self.root.glob(pattern):
                    with contextlib.suppress(FileNotFoundError):
                        temp.unlink()
            return removed

    def ping(self) -> None:
        folder = self.root / "tenants"
        if not folder.is_dir() or not os.access(folder, os.W_OK):
            raise StoreUnavailable("the prefix store folder is missing or not writable")

    def _record_path(self, tenant: str, task_id: str) -> Path:
        return self.root / "tenants" / validate_tenant(tenant) / f"{validate_task_id(task_id)}{_RECORD}"

    def _blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise PrefixNotFound("malformed blob address")
        return self.root / "blobs" / sha256[:2] / f"{sha256}{_BLOB}"

    def _read_record(self, path: Path) -> PrefixRecord | None:
        try:
            return PrefixRecord.from_json(json.loads(path.read_bytes()))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read a prefix record: {exc.strerror}") from None

    def _settled_usage(self, tenant: str) -> TenantUsage:
        """The tenant's usage (under its usage lock): the file's figures, settled against the record of
        the write it says was in progress, or rebuilt from the records when there is no file."""
        try:
            kept = json.loads(self._usage_path(tenant).read_bytes())
        except FileNotFoundError:
            return self._counted_usage(tenant)
        pending = kept.get("pending")
        if pending is not None:
            current = self._read_record(self._record_path(tenant, pending["task_id"]))
            if (current.version if current is not None else None) != pending["version"]:
                return TenantUsage(**pending["before"])  # the write did not happen
        return TenantUsage(kept["prefixes"], kept["bytes"])

    def _counted_usage(self, tenant: str) -> TenantUsage:
        """The tenant's usage counted from its records (once per tenant: no usage file yet)."""
        records = [self._read_record(path) for path in (self.root / "tenants" / tenant).glob(f"*{_RECORD}")]
        present = [record for record in records if record is not None]
        return TenantUsage(len(present), sum(record.bytes for record in present))

    def _write_usage(
        self, tenant: str, usage: TenantUsage, *, pending: tuple[str, str | None, TenantUsage]
    ) -> None:
        """Keep ``usage``, the figures after the write ``pending`` (task id, the version it makes current
        or None for a delete, the figures before it) that the caller makes next."""
        task_id, version, before = pending
        kept = {
            **usage.__dict__,
            "pending": {"task_id": task_id, "version": version, "before": before.__dict__},
        }
        _atomic_write(self._usage_path(tenant), json.dumps(kept).encode())

    def _usage_path(self, tenant: str) -> Path:
        return self.root / "usage" / f"{validate_tenant(tenant)}.json"

    def _referenced_blobs(self) -> set[str]:
        referenced: set[str] = set()
        for path in (self.root / "tenants").glob(f"*/*{_RECORD}"):
            record = self._read_record(path)  # records are written whole: a bad one is a real problem
            if record is not None:
                referenced.add(record.sha256)
        return referenced

    def _unreferenced(self, sha256: str) -> None:
        """A record stopped naming this blob: its grace period starts now (other records may still name it)."""
        with contextlib.suppress(FileNotFoundError):
            os.utime(self._blob_path(sha256))

    def _maybe_collect_garbage(self) -> None:
        """Start a background collection when the last one (by any process) is older than the interval."""
        if self.gc_interval_s is None:
            return
        stamp = self.root / "locks" / "gc.stamp"
        try:
            if time.time() - stamp.stat().st_mtime < self.gc_interval_s:
                return
        except FileNotFoundError:
            pass
        except OSError:
            return
        if not self._gc_running.acquire(blocking=False):
            return
        with contextlib.suppress(OSError):
            stamp.touch()
        threading.Thread(target=self._collect_quietly, name="prefix-store-gc", daemon=True).start()

    def _collect_quietly(self) -> None:
        try:
            removed = self.collect_garbage()
            if removed:
                log.info("prefix store: collected %d unreferenced blobs", removed)
        except Exception:
            log.exception("prefix store: garbage collection failed")
        finally:
            self._gc_running.release()

    @contextlib.contextmanager
    def _task_lock(self, tenant: str, task_id: str) -> Iterator[None]:
        name = f"{validate_tenant(tenant)}.{validate_task_id(task_id)}.lock"
        with _flock(self.root / "locks" / name, fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def _usage_lock(self, tenant: str) -> Iterator[None]:
        with _flock(self.root / "locks" / f"{validate_tenant(tenant)}.usage-lock", fcntl.LOCK_EX):
            yield

    @contextlib.contextmanager
    def _gc_lock(self, *, shared: bool) -> Iterator[None]:
        with _flock(self.root / "locks" / "gc.lock", fcntl.LOCK_SH if shared else fcntl.LOCK_EX):
            yield


@contextlib.contextmanager
def _flock(path: Path, mode: int) -> Iterator[None]:
    """An advisory lock held by this open file (so threads and processes exclude each other alike);
    the kernel drops it if the process dies."""
    with path.open("a") as lock_file:
        fcntl.flock(lock_file, mode)
        try:
            yield
        finally:
            fcntl.flock(lock_file, fcntl.LOCK_UN)


@contextlib.contextmanager
def _os_errors(doing: str) -> Iterator[None]:
    try:
        yield
    except OSError as exc:
        raise StoreUnavailable(f"cannot {doing}: {exc.strerror or exc}") from None


def _check_precondition(current: PrefixRecord | None, precondition: Precondition | None) -> None:
    """Raise ``VersionMismatch`` unless the task's current record meets the precondition (called under
    the task's lock, so no writer can change the record before the caller's write)."""
    version = current.version if current is not None else None
    if precondition is not None and not precondition.holds(version):
        raise precondition.mismatch(version)


def _atomic_write(path: Path, data: bytes) -> None:
    """Write ``data`` to ``path`` so that readers see the old file or the whole new one, even after a crash."""
    path.parent.mkdir(parents=True, exist_ok=True)
    fd, temp = tempfile.mkstemp(dir=path.parent, prefix=f".{path.name}.", suffix=".tmp")
    try:
        with os.fdopen(fd, "wb") as file:
            file.write(data)
            file.flush()
            os.fsync(file.fileno())
        os.replace(temp, path)
    except BaseException:
        with contextlib.suppress(FileNotFoundError):
            os.unlink(temp)
        raise
    _fsync_folder(path.parent)


def _fsync_folder(folder: Path) -> None:
    fd = os.open(folder, os.O_RDONLY)
    try:
        os.fsync(fd)
    finally:
        os.close(fd)
