"""A tenant's usage and quota, kept by each backend with every write: exact under concurrent uploaders
(threads of one store object and two store objects, as two replicas on one backend), right after
replaces and deletes, and rebuilt when missing or left behind by a crash between its two steps."""

from __future__ import annotations

import json
import subprocess
import sys
import threading
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from pathlib import Path

import pytest

from prefix_store.errors import QuotaExceeded
from prefix_store.storage.filesystem import FileStore
from prefix_store.storage.redis_store import RedisStore
from prefix_store.storage.store import PrefixStore, Quota, TenantUsage, open_store
from tests.prefix_store.conftest import make_blob, put

BLOB = len(make_blob(1))  # every test blob has the same size


def listed_usage(store: PrefixStore, tenant: str) -> TenantUsage:
    records = store.list(tenant)
    return TenantUsage(len(records), sum(record.bytes for record in records))


def test_usage_follows_puts_replaces_and_deletes(store: PrefixStore) -> None:
    assert store.usage("acme") == TenantUsage(0, 0)
    for i in range(3):
        put(store, "acme", f"task-{i}", make_blob(i))
    put(store, "acme", "task-0", make_blob(9, num_virtual_tokens=8))  # a replace by a larger blob
    store.delete("acme", "task-1")
    put(store, "globex", "task-0", make_blob(1))
    assert store.usage("acme") == listed_usage(store, "acme") == TenantUsage(2, BLOB + len(make_blob(9, 8)))
    assert store.usage("globex") == TenantUsage(1, BLOB)


def test_a_quota_refuses_what_would_pass_it_and_stores_nothing(store: PrefixStore) -> None:
    quota = Quota(max_prefixes=2, max_bytes=3 * BLOB)
    put(store, "acme", "a", make_blob(1), quota=quota)
    put(store, "acme", "b", make_blob(2), quota=quota)
    with pytest.raises(QuotaExceeded) as refused:
        put(store, "acme", "c", make_blob(3), quota=quota)
    assert (refused.value.what, refused.value.limit, refused.value.usage) == ("prefixes", 2, 2)
    put(store, "acme", "a", make_blob(4), quota=quota)  # a replace adds no task
    with pytest.raises(QuotaExceeded, match="bytes"):  # 2 blobs → 1 blob + one of twice the size
        put(store, "acme", "b", make_blob(5, num_virtual_tokens=16), quota=Quota(max_bytes=2 * BLOB))
    assert [r.task_id for r in store.list("acme")] == ["a", "b"]
    assert store.head("acme", "b").sha256 == put(store, "acme", "b", make_blob(2))[0].sha256  # unchanged
    put(store, "acme", "a", make_blob(6), quota=Quota(max_bytes=BLOB))  # over a lowered limit, not growing
    store.delete("acme", "b")
    put(store, "acme", "c", make_blob(3), quota=quota)  # the delete freed a place
    assert store.usage("acme") == listed_usage(store, "acme") == TenantUsage(2, 2 * BLOB)


@pytest.mark.parametrize("stores", [1, 2], ids=["one store object", "two store objects"])
def test_a_quota_is_exact_under_16_concurrent_uploaders(
    store_factory: Callable[..., PrefixStore], stores: int
) -> None:
    """16 threads upload 64 tasks against a limit of 10 (and, for another tenant, a byte limit of 7 blobs)
    through one store object or two (two replicas on one backend): exactly 10 and 7 are stored."""
    objects = [store_factory() for _ in range(stores)]

    def upload(i: int) -> bool:
        tenant, quota = ("count", Quota(max_prefixes=10)) if i % 2 else ("size", Quota(max_bytes=7 * BLOB))
        try:
            put(objects[i % stores], tenant, f"task-{i}", make_blob(i % 4), quota=quota)
        except QuotaExceeded:
            return False
        return True

    with ThreadPoolExecutor(16) as pool:
        stored = list(pool.map(upload, range(128)))
    assert sum(stored) == 17
    for tenant, expected in (("count", 10), ("size", 7)):
        assert (
            objects[0].usage(tenant)
            == listed_usage(objects[0], tenant)
            == TenantUsage(expected, expected * BLOB)
        )


def test_a_missing_usage_is_counted_from_the_records(store: PrefixStore) -> None:
    for i in range(4):
        put(store, "acme", f"task-{i}", make_blob(i))
    store.delete("acme", "task-3")
    if isinstance(store, FileStore):
        (store.root / "usage" / "acme.json").unlink()
    else:
        assert isinstance(store, RedisStore)
        store._redis.delete(store._usage_key("acme"))  # a store written before usage was kept
    assert store.usage("acme") == TenantUsage(3, 3 * BLOB)
    with pytest.raises(QuotaExceeded):
        put(store, "acme", "task-9", make_blob(9), quota=Quota(max_prefixes=3))


def test_a_crash_between_the_usage_and_the_record_leaves_the_right_count(tmp_path) -> None:
    """The filesystem writes the new usage first (with the write in progress), then the record: a crash
    between the two leaves a usage whose write did not happen, which the next reader settles back."""
    store = FileStore(tmp_path)
    put(store, "acme", "a", make_blob(1))
    path = tmp_path / "usage" / "acme.json"
    kept = json.loads(path.read_text())
    before = {"prefixes": kept["prefixes"], "bytes": kept["bytes"]}
    path.write_text(
        json.dumps(
            {
                "prefixes": 2,
                "bytes": 2 * BLOB,
                "pending": {"task_id": "b", "version": "1-000000000000", "before": before},
            }
        )
    )  # what a writer of "b" left when it died before its record
    assert store.usage("acme") == TenantUsage(1, BLOB)
    put(store, "acme", "b", make_blob(2))
    assert store.usage("acme") == listed_usage(store, "acme") == TenantUsage(2, 2 * BLOB)


def test_a_paged_walk_sees_every_task_present_throughout_exactly_once(store: PrefixStore) -> None:
    """Pages of 7 while another thread uploads and deletes tasks whose names fall between the walked ones:
    every task present throughout is seen once, none twice, in task-id order."""
    stable = [f"task-{i:03d}" for i in range(60)]
    for name in stable:
        put(store, "acme", name, make_blob(1))
    done = threading.Event()

    def churn() -> None:
        i = 0
        while not done.is_set():
            name = f"task-{i % 60:03d}-x"
            put(store, "acme", name, make_blob(2))
            store.delete("acme", name)
            put(store, "acme", f"task-{(i * 7) % 60:03d}", make_blob(3))  # replaces keep their place
            i += 1

    churner = threading.Thread(target=churn)
    churner.start()
    try:
        seen, cursor = [], None
        while True:
            page = store.list_page("acme", cursor=cursor, limit=7)
            seen += [record.task_id for record in page.records]
            if page.next_cursor is None:
                break
            cursor = page.next_cursor
    finally:
        done.set()
        churner.join()
    assert seen == sorted(set(seen)) and [name for name in seen if not name.endswith("-x")] == stable


_REPLICA = """
import sys
from concurrent.futures import ThreadPoolExecutor
from prefix_store.errors import QuotaExceeded
from prefix_store.storage.store import Quota, open_store
from tests.prefix_store.conftest import make_blob, put

with open_store(sys.argv[1]) as store:
    def upload(i):
        try:
            put(store, "shared", f"{sys.argv[2]}-{i}", make_blob(i % 4), quota=Quota(max_prefixes=25))
        except QuotaExceeded:
            return 0
        return 1

    with ThreadPoolExecutor(8) as pool:
        print(sum(pool.map(upload, range(40))))
"""


@pytest.mark.e2e
@pytest.mark.parametrize("backend", ["file", "redis"])
def test_two_replica_processes_on_one_store_never_pass_a_quota_together(
    backend: str, tmp_path: Path, request: pytest.FixtureRequest
) -> None:
    """Two processes (replicas) of 8 uploading threads each, 80 new tasks against a limit of 25 on one
    store: exactly 25 stored, and the usage says so."""
    url = request.getfixturevalue("redis_url") if backend == "redis" else (tmp_path / "store").as_uri()
    replicas = [
        subprocess.Popen(
            [sys.executable, "-c", _REPLICA, url, name], stdout=subprocess.PIPE, cwd=Path(__file__).parents[2]
        )
        for name in ("a", "b")
    ]
    stored = sum(int(replica.communicate(timeout=120)[0]) for replica in replicas)
    with open_store(url) as store:
        assert stored == 25 and store.usage("shared") == listed_usage(store, "shared") == TenantUsage(
            25, 25 * BLOB
        )
