"""The storage interface: versioned prefix records per ``(tenant, task_id)`` over content-addressed blobs."""

from __future__ import annotations

import abc
from dataclasses import dataclass
from urllib.parse import urlparse

from prefix_store.errors import PrefixStoreError


class PrefixNotFound(PrefixStoreError):
    """No prefix of that task id in that tenant (or no such version)."""


class VersionMismatch(PrefixStoreError):
    """An ``If-Match`` precondition named a version that is not the current one."""


class StoreUnavailable(PrefixStoreError):
    """The storage backend cannot be reached."""


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

    def to_json(self) -> dict[str, object]:
        return dict(self.__dict__)

    @classmethod
    def from_json(cls, data: dict[str, object]) -> PrefixRecord:
        return cls(**data)  # type: ignore[arg-type]


class PrefixStore(abc.ABC):
    """Where prefixes live. Blobs are written before the record that names them, so a crash leaves the old
    version or the new one, never a torn one."""

    @abc.abstractmethod
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
        """Store ``blob`` (a validated native prefix) as the task's new current version.

        Returns the new record and whether it replaced an earlier version. Raises ``VersionMismatch``
        when ``if_match`` is given and is not the current version.
        """

    @abc.abstractmethod
    def head(self, tenant: str, task_id: str) -> PrefixRecord:
        """The current record; raises ``PrefixNotFound``."""

    @abc.abstractmethod
    def get_blob(self, record: PrefixRecord) -> bytes:
        """The native prefix bytes a record names; raises ``PrefixNotFound``."""

    @abc.abstractmethod
    def list(self, tenant: str) -> list[PrefixRecord]:
        """Every current record of one tenant, sorted by task id."""

    @abc.abstractmethod
    def delete(self, tenant: str, task_id: str, *, if_match: str | None = None) -> None:
        """Remove the task; raises ``PrefixNotFound`` or ``VersionMismatch``."""

    def ping(self) -> None:  # noqa: B027 - optional for backends that are always there
        """Raise ``StoreUnavailable`` if the backend cannot answer."""


def open_store(url: str) -> PrefixStore:
    """Build a store from its URL: ``file:///abs/path``."""
    parsed = urlparse(url)
    if parsed.scheme == "file":
        from prefix_store.filesystem import FileStore

        if parsed.netloc not in ("", "localhost") or not parsed.path.startswith("/"):
            raise ValueError(f"a file store URL is file:///absolute/path, got {url!r}")
        return FileStore(parsed.path)
    raise ValueError(f"unsupported store URL scheme {parsed.scheme!r}: use file:///abs/path")
