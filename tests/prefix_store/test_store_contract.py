"""The storage contract, run against every backend: the filesystem in a temp folder and a real Redis."""

from __future__ import annotations

import hashlib
import threading
import time
from collections.abc import Callable
from pathlib import Path

import pytest

from prefix_store.errors import InvalidName, PrefixNotFound, VersionMismatch
from prefix_store.storage.changes import ChangeEvent
from prefix_store.storage.filesystem import FileStore
from prefix_store.storage.store import (
    ANY_VERSION,
    MAX_PAGE_SIZE,
    PrefixRecord,
    PrefixStore,
    version_sequence,
)
from tests.prefix_store.conftest import make_blob, put, wait_for

BAD_NAMES = ["../escape", "/abs", ".hidden", "a/b", "", "x" * 129, "sp ace", "nul\x00", "a:b"]


def test_put_head_get_replace(store: PrefixStore) -> None:
    blob_one, blob_two = make_blob(1), make_blob(2)
    before = time.time()
    first, replaced = put(store, "acme", "summarize", blob_one)
    assert not replaced
    assert first.sha256 == hashlib.sha256(blob_one).hexdigest() and first.bytes == len(blob_one)
    assert (first.tenant, first.task_id, first.num_virtual_tokens, first.source_format) == (
        "acme",
        "summarize",
        4,
        "native",
    )
    assert before - 1 <= first.created_at <= time.time() + 1
    assert store.head("acme", "summarize") == first
    assert store.get_blob(first) == blob_one
    assert store.get("acme", "summarize") == (first, blob_one)

    second, replaced = store.put("acme", "summarize", blob_two, num_virtual_tokens=4, source_format="peft")
    assert replaced and second.source_format == "peft"
    assert version_sequence(second.version) > version_sequence(first.version)
    assert store.head("acme", "summarize") == second
    assert store.get("acme", "summarize", second.version) == (second, blob_two)
    with pytest.raises(PrefixNotFound, match="not its current version"):
        store.get("acme", "summarize", first.version)
    assert store.get_blob(first) == blob_one  # within the grace period an old version stays readable


def test_a_records_kind_is_kept_and_records_from_before_kinds_are_prefixes(store: PrefixStore) -> None:
    soft, _ = store.put(
        "acme", "soft", make_blob(3), num_virtual_tokens=4, source_format="peft", kind="soft_prompt"
    )
    plain, _ = put(store, "acme", "plain", make_blob(4))
    assert (soft.kind, plain.kind) == ("soft_prompt", "prefix")
    assert store.head("acme", "soft") == soft and {r.kind for r in store.list("acme")} == {
        "soft_prompt",
        "prefix",
    }
    old = {key: value for key, value in plain.to_json().items() if key != "kind"}  # as stored before kinds
    assert PrefixRecord.from_json(old) == plain


def test_same_content_twice_is_a_new_version_of_the_same_blob(store: PrefixStore) -> None:
    blob = make_blob(1)
    first, _ = put(store, "t", "a", blob)
    again, replaced = put(store, "t", "a", blob)
    assert replaced and again.version != first.version and again.sha256 == first.sha256
    assert store.get("t", "a") == (again, blob)


def test_tenants_are_separate(store: PrefixStore) -> None:
    put(store, "acme", "summarize", make_blob(1))
    put(store, "globex", "summarize", make_blob(2))
    assert store.get("acme", "summarize")[1] == make_blob(1)
    assert store.get("globex", "summarize")[1] == make_blob(2)
    assert [r.task_id for r in store.list("acme")] == ["summarize"]
    store.delete("globex", "summarize")
    assert store.head("acme", "summarize")
    with pytest.raises(PrefixNotFound):
        store.head("globex", "summarize")
    assert store.list("globex") == [] and store.list("initech") == []


def test_list_pages_in_task_id_order(store: PrefixStore) -> None:
    names = [f"task-{i:02d}" for i in range(23)]
    for name in reversed(names):
        put(store, "acme", name, make_blob(0))
    put(store, "other", "task-99", make_blob(0))
    seen, cursor, pages = [], None, 0
    while True:
        page = store.list_page("acme", cursor=cursor, limit=10)
        seen += [r.task_id for r in page.records]
        pages += 1
        if page.next_cursor is None:
            break
        cursor = page.next_cursor
    assert seen == names and pages == 3
    assert [r.task_id for r in store.list("acme")] == names
    exact = store.list_page("acme", cursor="task-12", limit=10)
    assert [r.task_id for r in exact.records] == names[13:] and exact.next_cursor is None
    assert store.list_page("acme", cursor="task-22").records == []
    with pytest.raises(ValueError, match="limit"):
        store.list_page("acme", limit=0)
    with pytest.raises(ValueError, match="limit"):
        store.list_page("acme", limit=MAX_PAGE_SIZE + 1)
    with pytest.raises(InvalidName):
        store.list_page("acme", cursor="../x")


def test_delete_and_recreate(store: PrefixStore) -> None:
    record, _ = put(store, "t", "task", make_blob(1))
    store.delete("t", "task")
    with pytest.raises(PrefixNotFound):
        store.head("t", "task")
    with pytest.raises(PrefixNotFound):
        store.get("t", "task")
    with pytest.raises(PrefixNotFound):
        store.delete("t", "task")
    assert store.list("t") == []
    again, replaced = put(store, "t", "task", make_blob(1))
    assert not replaced
    # versions are never reused, even across a delete: caches can order what they hear
    assert version_sequence(again.version) > version_sequence(record.version)


def test_if_match(store: PrefixStore) -> None:
    record, _ = put(store, "t", "task", make_blob(1))
    with pytest.raises(VersionMismatch, match="does not match the current version"):
        put(store, "t", "task", make_blob(2), if_match="0-stale")
    assert store.get("t", "task")[1] == make_blob(1)
    updated, _ = put(store, "t", "task", make_blob(2), if_match=record.version)
    with pytest.raises(VersionMismatch):
        store.delete("t", "task", if_match=record.version)
    store.delete("t", "task", if_match=updated.version)
    with pytest.raises(VersionMismatch):
        put(store, "t", "task", make_blob(3), if_match=updated.version)  # nothing to match any more


def test_concurrent_puts_get_distinct_versions_and_one_if_match_wins(store: PrefixStore) -> None:
    base, _ = put(store, "t", "task", make_blob(0))
    versions: list[str] = []
    outcomes: list[str] = []
    lock = threading.Lock()

    def writer(seed: int) -> None:
        for i in range(4):
            record, _ = put(store, "t", "task", make_blob(seed * 10 + i))
            with lock:
                versions.append(record.version)

    def conditional(seed: int) -> None:
        try:
            put(store, "t", "contended", make_blob(seed), if_match=contended.version)
            outcome = "won"
        except VersionMismatch:
            outcome = "lost"
        with lock:
            outcomes.append(outcome)

    contended, _ = put(store, "t", "contended", make_blob(0))
    threads = [threading.Thread(target=writer, args=(s,)) for s in range(6)]
    threads += [threading.Thread(target=conditional, args=(s,)) for s in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    assert len(set(versions)) == 24
    assert sorted(version_sequence(v) for v in versions) == list(range(2, 26))
    assert version_sequence(store.head("t", "task").version) == 25 and base.version not in versions
    assert sorted(outcomes) == ["lost"] * 5 + ["won"]


def test_if_match_any_version_needs_a_current_version(store: PrefixStore) -> None:
    with pytest.raises(VersionMismatch, match="does not exist"):
        put(store, "t", "task", make_blob(1), if_match=ANY_VERSION)
    with pytest.raises(PrefixNotFound):
        store.head("t", "task")  # nothing was stored
    with pytest.raises(VersionMismatch, match="does not exist"):
        store.delete("t", "task", if_match=ANY_VERSION)
    first, _ = put(store, "t", "task", make_blob(1))
    second, replaced = put(store, "t", "task", make_blob(2), if_match=ANY_VERSION)
    assert replaced and store.get("t", "task") == (second, make_blob(2))
    store.delete("t", "task", if_match=ANY_VERSION)
    with pytest.raises(PrefixNotFound):
        store.head("t", "task")
    assert version_sequence(second.version) > version_sequence(first.version)


def test_if_match_a_collection_matches_any_of_its_versions(store: PrefixStore) -> None:
    record, _ = put(store, "t", "task", make_blob(1))
    for never in (["0-stale", "9-other"], []):
        with pytest.raises(VersionMismatch, match="does not match the current version"):
            put(store, "t", "task", make_blob(2), if_match=never)
        with pytest.raises(VersionMismatch):
            store.delete("t", "task", if_match=never)
    assert store.head("t", "task") == record
    updated, replaced = put(store, "t", "task", make_blob(2), if_match=("0-stale", record.version))
    assert replaced and store.get("t", "task") == (updated, make_blob(2))
    store.delete("t", "task", if_match={updated.version, "0-stale"})
    assert store.list("t") == []


def test_a_delete_with_if_match_of_a_task_that_does_not_exist_is_a_mismatch(store: PrefixStore) -> None:
    record, _ = put(store, "t", "task", make_blob(1))
    store.delete("t", "task")
    with pytest.raises(VersionMismatch, match=r"current version \(none\)"):
        store.delete("t", "task", if_match=record.version)
    with pytest.raises(PrefixNotFound):
        store.delete("t", "task")  # without a precondition: not found, as before


def test_if_absent_creates_only(store: PrefixStore) -> None:
    first, replaced = put(store, "t", "task", make_blob(1), if_absent=True)
    assert not replaced
    with pytest.raises(VersionMismatch, match=f"the task exists \\(version {first.version}\\)"):
        put(store, "t", "task", make_blob(2), if_absent=True)
    assert store.get("t", "task") == (first, make_blob(1))  # the old version keeps serving
    assert store.list("t") == [first]
    store.delete("t", "task")
    again, replaced = put(store, "t", "task", make_blob(2), if_absent=True)  # deleted: absent again
    assert not replaced and version_sequence(again.version) > version_sequence(first.version)
    with pytest.raises(ValueError, match="exclude each other"):
        put(store, "t", "task", make_blob(3), if_absent=True, if_match=again.version)
    assert store.head("t", "task") == again


def test_concurrent_creators_with_if_absent_one_wins(store_factory: Callable[..., PrefixStore]) -> None:
    stores = [store_factory() for _ in range(3)]
    start = threading.Barrier(6)
    outcomes: dict[int, str] = {}

    def creator(seed: int) -> None:
        start.wait()
        try:
            record, _ = put(stores[seed % 3], "t", "new", make_blob(seed), if_absent=True)
            outcomes[seed] = record.version
        except VersionMismatch:
            outcomes[seed] = "lost"

    threads = [threading.Thread(target=creator, args=(seed,)) for seed in range(6)]
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    winners = [seed for seed, outcome in outcomes.items() if outcome != "lost"]
    assert len(outcomes) == 6 and len(winners) == 1
    record, blob = stores[0].get("t", "new")
    assert record.version == outcomes[winners[0]] and blob == make_blob(winners[0])
    assert version_sequence(record.version) == 1  # the losers bumped nothing


def test_a_mismatch_quotes_an_excerpt_of_the_versions_it_was_given(store: PrefixStore) -> None:
    put(store, "t", "task", make_blob(1))
    huge = "7-" + "a" * 60_000
    with pytest.raises(VersionMismatch) as one:
        put(store, "t", "task", make_blob(2), if_match=huge)
    with pytest.raises(VersionMismatch) as many:
        store.delete("t", "task", if_match=[f"{n}-{'b' * 5000}" for n in range(100)])
    assert len(str(one.value)) < 200 and "(60002 characters)" in str(one.value)
    assert len(str(many.value)) < 400 and "(100 versions)" in str(many.value)


@pytest.mark.parametrize("name", BAD_NAMES)
def test_names_are_validated_before_any_io(store: PrefixStore, name: str, tmp_path: Path) -> None:
    calls: list[Callable[[], object]] = [
        lambda: put(store, "t", name, make_blob(1)),
        lambda: put(store, name, "task", make_blob(1)),
        lambda: store.head("t", name),
        lambda: store.head(name, "t"),
        lambda: store.delete("t", name),
        lambda: store.list_page(name),
        lambda: store.get("t", name),
    ]
    for call in calls:
        with pytest.raises(InvalidName):
            call()
    if isinstance(store, FileStore):
        assert [p for p in store.root.rglob("*") if p.is_file() and p.parent.name != "locks"] == []
    else:
        assert store._redis.dbsize() == 0  # type: ignore[attr-defined]


def test_unreferenced_blobs_are_collected(store_factory: Callable[..., PrefixStore]) -> None:
    store = store_factory(gc_grace_s=0)
    shared = make_blob(7)
    old, _ = put(store, "t", "task", make_blob(1))
    put(store, "t", "twin", shared)
    current, _ = put(store, "t", "task", shared)  # same content as another task: one blob, two records
    store.collect_garbage()
    with pytest.raises(PrefixNotFound):
        store.get_blob(old)
    assert store.get("t", "task") == (current, shared)
    store.delete("t", "twin")
    store.collect_garbage()
    assert store.get("t", "task") == (current, shared)  # still referenced by "task"
    store.delete("t", "task")
    store.collect_garbage()
    with pytest.raises(PrefixNotFound):
        store.get_blob(current)


def test_change_feed_reaches_local_subscribers_before_the_write_returns(store: PrefixStore) -> None:
    events: list[ChangeEvent] = []
    with store.subscribe(events.append):
        record, _ = put(store, "acme", "task", make_blob(1))
        assert events == [ChangeEvent("acme", "task", record.version)]
        store.delete("acme", "task")
        assert events[-1] == ChangeEvent("acme", "task", record.version, deleted=True)
    put(store, "acme", "task", make_blob(2))
    assert len(events) == 2  # closed subscriptions hear nothing


def test_ping(store: PrefixStore) -> None:
    store.ping()


def test_head_many(store: PrefixStore) -> None:
    a, _ = put(store, "t", "a", make_blob(1))
    b, _ = put(store, "u", "b", make_blob(2))
    assert store.head_many([("t", "a"), ("u", "b"), ("t", "missing")]) == {
        ("t", "a"): a,
        ("u", "b"): b,
        ("t", "missing"): None,
    }


def test_a_second_store_object_sees_writes_at_once(store_factory: Callable[..., PrefixStore]) -> None:
    writer, reader = store_factory(), store_factory()
    record, _ = put(writer, "t", "task", make_blob(1))
    assert reader.get("t", "task") == (record, make_blob(1))
    writer.delete("t", "task")
    with pytest.raises(PrefixNotFound):
        reader.head("t", "task")


@pytest.mark.e2e
def test_shared_backends_carry_the_feed_between_store_objects(redis_url: str) -> None:
    from prefix_store.storage.store import open_store

    with open_store(redis_url) as writer, open_store(redis_url) as reader:
        heard: list[ChangeEvent] = []
        resyncs: list[int] = []
        reader.subscribe(heard.append, on_resync=lambda: resyncs.append(1))
        wait_for(lambda: resyncs)  # subscribed
        record, _ = put(writer, "t", "task", make_blob(1))
        wait_for(lambda: heard == [ChangeEvent("t", "task", record.version)])
        writer.delete("t", "task")
        wait_for(lambda: len(heard) == 2 and heard[1].deleted)
