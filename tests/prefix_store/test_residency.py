"""The cache's bookkeeping on its own: LRU eviction of unpinned entries only, staleness, version order."""

from __future__ import annotations

from prefix_store.cache.residency import LoadState, ResidentSet
from prefix_store.storage.store import PrefixRecord


def _record(task_id: str, sequence: int) -> PrefixRecord:
    return PrefixRecord("t", task_id, f"{sequence}-abc", "0" * 64, 4, 100, 0.0, "native")


def _ready(residents: ResidentSet, record: PrefixRecord, nbytes: int = 100) -> None:
    entry = residents.add(record)
    assert residents.try_charge(entry, nbytes) is not None
    entry.state = LoadState.READY


def test_eviction_takes_unpinned_entries_least_recently_used_first() -> None:
    residents = ResidentSet(budget_bytes=300)
    for name in "abc":
        _ready(residents, _record(name, 1))
    residents.get(("t", "a", "1-abc")).pins = 1  # type: ignore[union-attr]
    residents.touch(residents.get(("t", "b", "1-abc")))  # type: ignore[arg-type]
    newcomer = residents.add(_record("d", 1))
    evicted = residents.try_charge(newcomer, 100)
    assert [e.record.task_id for e in evicted or []] == ["c"]  # a is pinned, b was used more recently
    blocked = residents.add(_record("e", 1))
    residents.get(("t", "b", "1-abc")).pins = 1  # type: ignore[union-attr]
    newcomer.state = LoadState.READY
    newcomer.pins = 1
    assert residents.try_charge(blocked, 100) is None  # everything pinned: nothing evicted
    assert residents.charged_bytes == 300 and residents.peak_bytes == 300


def test_a_new_version_makes_the_old_stale_and_older_news_is_ignored() -> None:
    residents = ResidentSet(budget_bytes=1000)
    _ready(residents, _record("a", 1))
    removed, warm = residents.observe(("t", "a"), "2-abc", track=False)
    assert [e.record.version for e in removed] == ["1-abc"] and warm
    assert residents.tracked_keys() == []  # nothing cached of it: not tracked
    _ready(residents, _record("a", 2))
    assert residents.latest_version(("t", "a")) == "2-abc"
    assert residents.observe(("t", "a"), "1-abc") == ([], False)  # older news
    assert residents.latest_ready(("t", "a")).record.version == "2-abc"  # type: ignore[union-attr]
    assert residents.observe(("t", "a"), "1-abc", deleted=True) == ([], False)  # an older delete
    removed, _ = residents.observe(("t", "a"), "2-abc", deleted=True)
    assert len(removed) == 1 and residents.tracked_keys() == [] and residents.charged_bytes == 0


def test_replacing_the_only_entry_keeps_the_task_tracked() -> None:
    residents = ResidentSet(budget_bytes=1000)
    _ready(residents, _record("a", 1))
    residents.observe(("t", "a"), "2-abc", track=True)  # an acquire saw version 2
    _ready(residents, _record("a", 2))
    assert residents.tracked_keys() == [("t", "a")] and residents.latest_version(("t", "a")) == "2-abc"


def test_a_pinned_old_version_stays_until_released() -> None:
    residents = ResidentSet(budget_bytes=1000)
    _ready(residents, _record("a", 1))
    residents.get(("t", "a", "1-abc")).pins = 1  # type: ignore[union-attr]
    removed, _ = residents.observe(("t", "a"), "2-abc")
    assert removed == [] and residents.get(("t", "a", "1-abc")).stale  # type: ignore[union-attr]
    late = residents.add(_record("a", 1))  # an acquire that read the old record before the swap
    assert late is not None
