"""The filesystem store: versions, atomic replace, If-Match, tenants kept apart, names never paths."""

from __future__ import annotations

import hashlib
import json
from pathlib import Path

import pytest

from prefix_store.errors import InvalidName, PrefixNotFound, VersionMismatch
from prefix_store.storage.filesystem import FileStore
from prefix_store.storage.store import open_store


@pytest.fixture
def store(tmp_path: Path) -> FileStore:
    return FileStore(tmp_path / "store")


def _put(store: FileStore, tenant: str, task_id: str, blob: bytes, **kwargs):
    return store.put(tenant, task_id, blob, num_virtual_tokens=4, source_format="native", **kwargs)


def test_put_head_get_and_replace(store: FileStore) -> None:
    first, replaced = _put(store, "acme", "summarize", b"one")
    assert not replaced and first.sha256 == hashlib.sha256(b"one").hexdigest() and first.bytes == 3
    assert store.head("acme", "summarize") == first
    assert store.get_blob(first) == b"one"
    second, replaced = _put(store, "acme", "summarize", b"two")
    assert replaced and second.version != first.version
    assert store.head("acme", "summarize").version == second.version
    assert store.get_blob(first) == b"one"  # an old version stays readable for requests still on it


def test_tenants_are_separate(store: FileStore) -> None:
    _put(store, "acme", "summarize", b"acme's")
    _put(store, "globex", "summarize", b"globex's")
    assert store.get_blob(store.head("acme", "summarize")) == b"acme's"
    assert [r.task_id for r in store.list("acme")] == ["summarize"]
    store.delete("globex", "summarize")
    assert store.head("acme", "summarize")
    with pytest.raises(PrefixNotFound):
        store.head("globex", "summarize")
    assert store.list("initech") == []


def test_if_match(store: FileStore) -> None:
    record, _ = _put(store, "t", "task", b"a")
    with pytest.raises(VersionMismatch, match="does not match the current version"):
        _put(store, "t", "task", b"b", if_match="0-stale")
    assert store.get_blob(store.head("t", "task")) == b"a"
    updated, _ = _put(store, "t", "task", b"b", if_match=record.version)
    with pytest.raises(VersionMismatch):
        store.delete("t", "task", if_match=record.version)
    store.delete("t", "task", if_match=updated.version)
    with pytest.raises(PrefixNotFound):
        store.delete("t", "task")


@pytest.mark.parametrize("task_id", ["../escape", ".hidden", "a/b", "", "x" * 129, "sp ace", "nul\x00"])
def test_task_ids_are_names_never_paths(store: FileStore, task_id: str) -> None:
    with pytest.raises(InvalidName):
        _put(store, "t", task_id, b"a")
    with pytest.raises(InvalidName):
        store.head("t", task_id)
    assert not any(p.suffix == ".json" for p in store.root.rglob("*"))


def test_files_are_written_whole_and_survive_reopening(store: FileStore, tmp_path: Path) -> None:
    record, _ = _put(store, "t", "task", b"payload")
    assert not list(store.root.rglob("*.tmp"))
    reopened = open_store((tmp_path / "store").as_uri())
    assert reopened.head("t", "task") == record
    assert json.loads((store.root / "tenants" / "t" / "task.json").read_text())["version"] == record.version


def test_store_urls() -> None:
    with pytest.raises(ValueError, match="unsupported store URL scheme"):
        open_store("s3://bucket")
    with pytest.raises(ValueError, match="absolute"):
        open_store("file://relative/path")


def test_a_file_url_names_its_folder_unescaped(tmp_path: Path) -> None:
    folder = tmp_path / "my data"
    store = open_store(folder.as_uri())  # file:///…/my%20data
    assert isinstance(store, FileStore)
    assert store.root == folder
