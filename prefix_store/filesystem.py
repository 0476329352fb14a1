"""The filesystem store (embedded default): ``file:///abs/path``.

Layout under the root, built only from validated names:

    blobs/<sha256[:2]>/<sha256>.safetensors     content-addressed native prefix files
    tenants/<tenant>/<task_id>.json             the record naming a task's current version

Every file is written to a temporary name, fsynced, renamed into place, and its folder fsynced, so
an acknowledged upload survives a crash and a crash never leaves a torn file. Writers of one task
serialise on an advisory lock, so several server processes may share the folder.
"""

from __future__ import annotations

import contextlib
import fcntl
import hashlib
import json
import os
import tempfile
import time
from collections.abc import Iterator
from pathlib import Path

from prefix_store.names import validate_task_id, validate_tenant
from prefix_store.store import PrefixNotFound, PrefixRecord, PrefixStore, StoreUnavailable, VersionMismatch


class FileStore(PrefixStore):
    def __init__(self, root: str | Path) -> None:
        self.root = Path(root)
        try:
            for folder in (self.root / "blobs", self.root / "tenants", self.root / "locks"):
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
        if_match: str | None = None,
    ) -> tuple[PrefixRecord, bool]:
        sha256 = hashlib.sha256(blob).hexdigest()
        with self._task_lock(tenant, task_id):
            previous = self._read_record(tenant, task_id)
            _check_precondition(previous, if_match)
            blob_path = self._blob_path(sha256)
            if not blob_path.exists():
                _atomic_write(blob_path, blob)
            sequence = int(previous.version.split("-", 1)[0]) + 1 if previous else 1
            record = PrefixRecord(
                tenant=tenant,
                task_id=task_id,
                version=f"{sequence}-{sha256[:12]}",
                sha256=sha256,
                num_virtual_tokens=num_virtual_tokens,
                bytes=len(blob),
                created_at=time.time(),
                source_format=source_format,
            )
            _atomic_write(self._record_path(tenant, task_id), json.dumps(record.to_json()).encode())
        return record, previous is not None

    def head(self, tenant: str, task_id: str) -> PrefixRecord:
        record = self._read_record(tenant, task_id)
        if record is None:
            raise PrefixNotFound(f"no prefix named {task_id!r}")
        return record

    def get_blob(self, record: PrefixRecord) -> bytes:
        try:
            return self._blob_path(record.sha256).read_bytes()
        except FileNotFoundError:
            raise PrefixNotFound(f"the blob of {record.task_id!r} version {record.version} is gone") from None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read a prefix blob: {exc.strerror}") from None

    def list(self, tenant: str) -> list[PrefixRecord]:
        folder = self.root / "tenants" / validate_tenant(tenant)
        if not folder.is_dir():
            return []
        records = (self._read_record(tenant, path.stem) for path in sorted(folder.glob("*.json")))
        return [record for record in records if record is not None]

    def delete(self, tenant: str, task_id: str, *, if_match: str | None = None) -> None:
        with self._task_lock(tenant, task_id):
            record = self.head(tenant, task_id)
            _check_precondition(record, if_match)
            path = self._record_path(tenant, task_id)
            path.unlink()
            _fsync_folder(path.parent)

    def ping(self) -> None:
        if not (self.root / "tenants").is_dir():
            raise StoreUnavailable("the prefix store folder is missing")

    def _record_path(self, tenant: str, task_id: str) -> Path:
        return self.root / "tenants" / validate_tenant(tenant) / f"{validate_task_id(task_id)}.json"

    def _blob_path(self, sha256: str) -> Path:
        if len(sha256) != 64 or any(c not in "0123456789abcdef" for c in sha256):
            raise PrefixNotFound("malformed blob address")
        return self.root / "blobs" / sha256[:2] / f"{sha256}.safetensors"

    def _read_record(self, tenant: str, task_id: str) -> PrefixRecord | None:
        try:
            return PrefixRecord.from_json(json.loads(self._record_path(tenant, task_id).read_bytes()))
        except FileNotFoundError:
            return None
        except OSError as exc:
            raise StoreUnavailable(f"cannot read a prefix record: {exc.strerror}") from None

    @contextlib.contextmanager
    def _task_lock(self, tenant: str, task_id: str) -> Iterator[None]:
        lock_path = self.root / "locks" / f"{validate_tenant(tenant)}.{validate_task_id(task_id)}.lock"
        with lock_path.open("a") as lock_file:
            fcntl.flock(lock_file, fcntl.LOCK_EX)
            try:
                yield
            finally:
                fcntl.flock(lock_file, fcntl.LOCK_UN)


def _check_precondition(current: PrefixRecord | None, if_match: str | None) -> None:
    if if_match is not None and (current is None or current.version != if_match):
        have = current.version if current else "none"
        raise VersionMismatch(f"If-Match {if_match!r} does not match the current version ({have})")


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
