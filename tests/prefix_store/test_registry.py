"""The device registry over the filesystem store: pins, hot swap, single flight, byte budget, host tier,
invalidation by feed and by reconcile, preload. (Redis-specific behaviour: test_registry_redis.py.)"""

from __future__ import annotations

import asyncio
import random
import threading
from collections.abc import Callable, Iterator
from dataclasses import replace
from pathlib import Path

import pytest
import torch

from prefix_store.cache.registry import PrefixHandle, PrefixRegistry
from prefix_store.errors import InvalidName, PrefixCacheFull, PrefixNotFound, PrefixValidationError
from prefix_store.formats.limits import PrefixLimits
from prefix_store.formats.native import encode_native
from prefix_store.geometry import ModelGeometry, Projection
from prefix_store.lora import LoraAdapter, LoraModule
from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from prefix_store.storage.filesystem import FileStore
from prefix_store.storage.store import PrefixRecord
from testing.waiting import wait_until_async
from tests.prefix_store.conftest import GEOMETRY, PREFIX_BYTES, make_blob, put, wait_for


class GatedStore(FileStore):
    """A real filesystem store whose blob reads can be held at a gate and are counted."""

    def __init__(self, root: Path) -> None:
        super().__init__(root)
        self.gate = threading.Event()
        self.gate.set()
        self.blob_reads = 0

    def get_blob(self, record: PrefixRecord) -> bytes:
        self.blob_reads += 1
        assert self.gate.wait(10), "gate never opened"
        return super().get_blob(record)


@pytest.fixture
def store(tmp_path: Path) -> GatedStore:
    return GatedStore(tmp_path / "store")


@pytest.fixture
def make_registry(store: GatedStore) -> Iterator[Callable[..., PrefixRegistry]]:
    registries: list[PrefixRegistry] = []

    def factory(**options: object) -> PrefixRegistry:
        options = {"device": "cpu", "dtype": torch.float32, "limits": PrefixLimits(), **options}
        registry = PrefixRegistry(options.pop("store", store), GEOMETRY, **options)  # type: ignore[arg-type]
        registries.append(registry)
        return registry

    yield factory
    for registry in registries:
        registry.close()


def _expected(seed: int) -> torch.Tensor:
    from prefix_store.formats.native import decode_native

    return decode_native(make_blob(seed), GEOMETRY, PrefixLimits()).keys


def test_acquire_pins_the_current_version_in_the_model_dtype(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    record, _ = put(store, "acme", "task", make_blob(1))
    registry = make_registry(dtype=torch.bfloat16)
    handle = registry.acquire("acme", "task")
    assert handle.record == record and registry.is_resident(record)
    assert handle.prefix.keys.dtype == torch.bfloat16 and handle.prefix.keys.device.type == "cpu"
    torch.testing.assert_close(handle.prefix.keys, _expected(1).to(torch.bfloat16))
    assert registry.stats().pinned_count == 1 and registry.stats().resident_bytes == PREFIX_BYTES // 2
    registry.release(handle)
    registry.release(handle)  # a second release is ignored, not a second unpin
    stats = registry.stats()
    assert stats.pinned_count == 0 and stats.resident_count == 1
    with registry.pinned("acme", "task") as again:
        assert again.record == record
    assert registry.stats().hits == 1 and registry.stats().misses == 1


def test_names_and_missing_tasks(store: GatedStore, make_registry: Callable[..., PrefixRegistry]) -> None:
    registry = make_registry()
    with pytest.raises(InvalidName):
        registry.acquire("acme", "../etc")
    with pytest.raises(PrefixNotFound):
        registry.acquire("acme", "missing")
    assert store.blob_reads == 0


def test_hot_swap_new_acquires_get_the_new_version_while_holders_keep_theirs(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = make_registry(prefetch_on_change=False)
    old, _ = put(store, "t", "task", make_blob(1))
    held = registry.acquire("t", "task")
    new, _ = put(store, "t", "task", make_blob(2))
    fresh = registry.acquire("t", "task")  # right after the upload returned
    assert fresh.record == new and held.record == old
    torch.testing.assert_close(held.prefix.keys, _expected(1))  # never a mix
    torch.testing.assert_close(fresh.prefix.keys, _expected(2))
    assert registry.stats().resident_bytes == 2 * PREFIX_BYTES
    registry.release(held)  # the superseded version goes as soon as its last holder lets go
    assert not registry.is_resident(old) and registry.stats().resident_bytes == PREFIX_BYTES
    assert registry.stats().invalidations == 1
    registry.release(fresh)


def test_a_shared_pin_keeps_its_version_across_a_swap_until_both_are_released(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = make_registry(prefetch_on_change=False)
    old, _ = put(store, "t", "task", make_blob(1))
    first = registry.acquire("t", "task")
    put(store, "t", "task", make_blob(2))
    second = registry.share(first)  # another sample of the same request: the same version, not the new one
    assert second.record == old and second.prefix is first.prefix
    registry.release(first)
    assert registry.is_resident(old) and registry.stats().pinned_count == 1  # the share still holds it
    registry.release(second)
    assert not registry.is_resident(old) and registry.stats().pinned_count == 0
    with pytest.raises(ValueError, match="released"):
        registry.share(second)


def test_delete_new_acquires_fail_holders_finish(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = make_registry()
    put(store, "t", "task", make_blob(1))
    held = registry.acquire("t", "task")
    store.delete("t", "task")
    with pytest.raises(PrefixNotFound):
        registry.acquire("t", "task")
    torch.testing.assert_close(held.prefix.keys, _expected(1))
    registry.release(held)
    assert registry.stats().resident_count == 0 and registry.resident_version("t", "task") is None


def test_single_flight_100_concurrent_acquires_read_the_store_once(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = make_registry()
    record, _ = put(store, "t", "cold", make_blob(1))
    store.gate.clear()
    handles: list[PrefixHandle] = []
    lock = threading.Lock()

    def acquire() -> None:
        handle = registry.acquire("t", "cold")
        with lock:
            handles.append(handle)

    threads = [threading.Thread(target=acquire) for _ in range(100)]
    for thread in threads:
        thread.start()
    wait_for(lambda: registry.stats().coalesced == 99, what="99 acquirers wait for the one load")
    store.gate.set()
    for thread in threads:
        thread.join()
    stats = registry.stats()
    assert store.blob_reads == 1 and stats.store_reads == 1
    assert (stats.misses, stats.coalesced, stats.hits) == (1, 99, 0)
    assert len(handles) == 100 and all(h.prefix is handles[0].prefix and h.record == record for h in handles)
    for handle in handles:
        registry.release(handle)
    assert registry.stats().pinned_count == 0


def test_a_failed_load_fails_every_waiter_once_and_is_retried_later(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    other = ModelGeometry(model_type="llama", num_layers=3, num_kv_heads=2, head_dim=4)
    put(store, "t", "wrong-model", make_blob(1, geometry=other))
    registry = make_registry()
    store.gate.clear()
    errors: list[BaseException] = []

    def acquire() -> None:
        try:
            registry.acquire("t", "wrong-model")
        except PrefixValidationError as exc:
            errors.append(exc)

    threads = [threading.Thread(target=acquire) for _ in range(20)]
    for thread in threads:
        thread.start()
    wait_for(lambda: registry.stats().coalesced == 19, what="19 acquirers wait")
    store.gate.set()
    for thread in threads:
        thread.join()
    assert len(errors) == 20 and store.blob_reads == 1 and "base model" in str(errors[0])
    assert len({id(e) for e in errors}) == 20  # each thread raised its own exception object
    stats = registry.stats()
    assert stats.load_failures == 1 and stats.resident_bytes == 0 and stats.resident_count == 0
    with pytest.raises(PrefixValidationError):
        registry.acquire("t", "wrong-model")
    assert store.blob_reads == 2


def test_budget_with_3n_tasks_in_rotation(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    n = 4
    registry = make_registry(budget_bytes=n * PREFIX_BYTES)
    tasks = [f"task-{i}" for i in range(3 * n)]
    for i, task in enumerate(tasks):
        put(store, "t", task, make_blob(i))
    pinned = [registry.acquire("t", tasks[0]), registry.acquire("t", tasks[1])]  # held throughout
    hits, misses = 0, 2
    for round_ in range(3):
        for i, task in enumerate(tasks):
            handle = registry.acquire("t", task)
            was_pinned = i < 2
            hits, misses = hits + was_pinned, misses + (not was_pinned)
            again = registry.acquire("t", task)  # resident right now: a hit
            hits += 1
            torch.testing.assert_close(handle.prefix.keys, _expected(i))
            registry.release(again)
            registry.release(handle)
            stats = registry.stats()
            assert stats.resident_bytes <= stats.budget_bytes
            assert all(registry.is_resident(p.record) for p in pinned), f"pinned evicted in round {round_}"
    stats = registry.stats()
    assert (stats.hits, stats.misses, stats.coalesced) == (hits, misses, 0)
    assert stats.store_reads == misses
    # 2 slots are pinned, so each of the 10 others evicts the least recently used unpinned one
    assert stats.evictions == misses - n
    assert stats.peak_resident_bytes == stats.budget_bytes
    for handle in pinned:
        torch.testing.assert_close(handle.prefix.keys, _expected(tasks.index(handle.record.task_id)))
        registry.release(handle)


def test_budget_under_concurrency_waits_for_room_and_never_overflows(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    n = 3
    registry = make_registry(budget_bytes=n * PREFIX_BYTES, cache_full_wait_s=10)
    tasks = [f"task-{i}" for i in range(3 * n)]
    for i, task in enumerate(tasks):
        put(store, "t", task, make_blob(i))
    errors: list[BaseException] = []

    def worker(seed: int) -> None:
        rng = random.Random(seed)
        try:
            for _ in range(60):
                with registry.pinned("t", rng.choice(tasks)) as handle:
                    assert handle.prefix.nbytes == PREFIX_BYTES
        except BaseException as exc:
            errors.append(exc)

    threads = [threading.Thread(target=worker, args=(seed,)) for seed in range(6)]  # 6 pins > 3 slots
    for thread in threads:
        thread.start()
    for thread in threads:
        thread.join()
    stats = registry.stats()
    assert errors == []
    assert stats.peak_resident_bytes <= stats.budget_bytes
    assert stats.hits + stats.misses + stats.coalesced == 6 * 60
    assert stats.pinned_count == 0 and stats.load_failures == 0


def test_cache_full_of_pinned_prefixes_fails_fast_or_waits(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    for i in range(3):
        put(store, "t", f"task-{i}", make_blob(i))
    store.put(
        "t", "large", make_blob(9, num_virtual_tokens=12), num_virtual_tokens=12, source_format="native"
    )
    registry = make_registry(budget_bytes=2 * PREFIX_BYTES)
    held = [registry.acquire("t", "task-0"), registry.acquire("t", "task-1")]
    with pytest.raises(PrefixCacheFull, match="in use by running requests"):
        registry.acquire("t", "task-2")
    reads = store.blob_reads
    with pytest.raises(PrefixCacheFull, match="more than the whole prefix cache"):
        registry.acquire("t", "large")
    assert store.blob_reads == reads  # known from the record: refused before reading the blob
    assert registry.stats().resident_bytes == 2 * PREFIX_BYTES

    registry.cache_full_wait_s = 10
    threading.Timer(0.1, registry.release, args=(held[0],)).start()
    with registry.pinned("t", "task-2") as handle:  # waits for the release, then evicts task-0
        assert handle.record.task_id == "task-2"
    assert registry.is_resident(held[1].record)
    registry.release(held[1])


def test_host_tier_serves_device_evictions_without_a_store_read(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    put(store, "t", "a", make_blob(1))
    put(store, "t", "b", make_blob(2))
    registry = make_registry(budget_bytes=PREFIX_BYTES, host_budget_bytes=4 * PREFIX_BYTES)
    for task in ["a", "b", "a", "b"]:
        with registry.pinned("t", task) as handle:
            torch.testing.assert_close(handle.prefix.keys, _expected(1 if task == "a" else 2))
    stats = registry.stats()
    assert (stats.misses, stats.store_reads, stats.host_hits, stats.evictions) == (4, 2, 2, 3)
    assert stats.host_bytes == 2 * PREFIX_BYTES


def test_other_processes_uploads_are_noticed_by_reconcile(
    store: GatedStore, tmp_path: Path, make_registry: Callable[..., PrefixRegistry]
) -> None:
    """Two store objects over one folder share no feed (as two processes would not): the registry
    notices the other's upload and delete by re-checking (its reconcile), the one way it can."""
    other_process = FileStore(tmp_path / "store")
    put(other_process, "t", "task", make_blob(1))
    registry = make_registry(reconcile_interval_s=0.2)
    registry.release(registry.acquire("t", "task"))
    new, _ = put(other_process, "t", "task", make_blob(2))
    wait_for(lambda: registry.resident_version("t", "task") == new.version, what="the reconcile sees it")
    assert registry.stats().prefetches == 1  # and loaded it before anyone asked
    other_process.delete("t", "task")
    wait_for(lambda: registry.resident_version("t", "task") is None, what="the reconcile sees the delete")
    assert registry.stats().resident_bytes == 0


def test_a_task_stays_watched_across_many_versions(
    store: GatedStore, tmp_path: Path, make_registry: Callable[..., PrefixRegistry]
) -> None:
    other_process = FileStore(tmp_path / "store")
    registry = make_registry(reconcile_interval_s=0.05)
    for seed in range(3):
        put(other_process, "t", "task", make_blob(seed))
        registry.release(registry.acquire("t", "task"))  # replaces the version it had
        new, _ = put(other_process, "t", "task", make_blob(seed + 10))
        wait_for(
            lambda new=new: registry.resident_version("t", "task") == new.version, what="the new version"
        )


def test_local_uploads_reach_the_registry_through_the_feed(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = make_registry(reconcile_interval_s=None)  # the feed alone
    put(store, "t", "task", make_blob(1))
    registry.release(registry.acquire("t", "task"))
    new, _ = put(store, "t", "task", make_blob(2))
    wait_for(lambda: registry.resident_version("t", "task") == new.version, what="the feed brings it")
    reads = store.blob_reads
    with registry.pinned("t", "task") as handle:  # prefetched: a hit
        assert handle.record == new
    assert store.blob_reads == reads and registry.stats().hits == 1


def test_preload_with_pin_survives_pressure_and_follows_new_versions(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    for i in range(4):
        put(store, "t", f"task-{i}", make_blob(i))
    registry = make_registry(budget_bytes=3 * PREFIX_BYTES, prefetch_on_change=False)
    failures = registry.preload([("t", "task-0"), ("t", "missing")], pin=True)
    assert list(failures) == [("t", "missing")] and isinstance(failures[("t", "missing")], PrefixNotFound)
    for _ in range(2):
        for i in range(1, 4):
            registry.release(registry.acquire("t", f"task-{i}"))
    assert registry.resident_version("t", "task-0") is not None
    new, _ = put(store, "t", "task-0", make_blob(10))
    wait_for(lambda: registry.resident_version("t", "task-0") == new.version, what="the new version")
    wait_for(lambda: registry.stats().pinned_count == 1, what="the pin moved to the new version")
    registry.unpin("t", "task-0")
    assert registry.stats().pinned_count == 0


def test_acquire_async_releases_the_pin_of_a_cancelled_caller(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    registry = make_registry()
    put(store, "t", "task", make_blob(1))

    async def scenario() -> None:
        store.gate.clear()
        waiter = asyncio.ensure_future(registry.acquire_async("t", "task"))
        await wait_until_async(lambda: store.blob_reads == 1, "the load is held at the store's gate")
        waiter.cancel()
        with pytest.raises(asyncio.CancelledError):
            await waiter
        store.gate.set()
        handle = await registry.acquire_async("t", "task")
        registry.release(handle)

    asyncio.run(scenario())
    wait_for(lambda: registry.stats().pinned_count == 0, what="the late pin is given back")
    assert registry.stats().resident_count == 1


def test_a_soft_prompt_is_encoded_once_per_load_into_the_prefix_its_rows_attend_to(store: GatedStore) -> None:
    geometry = replace(GEOMETRY, embedding_dim=8)
    soft = SoftPrompt(torch.randn(3, 8))
    store.put(
        "acme",
        "soft",
        encode_native(soft, geometry),
        num_virtual_tokens=3,
        source_format="native",
        kind="soft_prompt",
    )
    encoded: list[torch.Tensor] = []

    def encode(
        given: SoftPrompt,
    ) -> Prefix:  # stands in for the model: a prefix that depends on the embeddings
        encoded.append(given.embeddings)
        keys = given.embeddings.sum() * torch.ones(geometry.prefix_shape(given.num_virtual_tokens))
        return Prefix(keys, -keys)

    with PrefixRegistry(
        store,
        geometry,
        device="cpu",
        dtype=torch.float32,
        limits=PrefixLimits(),
        encode_soft_prompt=encode,
        host_budget_bytes=1 << 20,
    ) as registry:
        with registry.pinned("acme", "soft") as handle:
            assert handle.record.kind == "soft_prompt"
            torch.testing.assert_close(
                handle.prefix.keys, soft.embeddings.sum() * torch.ones(geometry.prefix_shape(3))
            )
        with registry.pinned("acme", "soft"):
            pass
        assert len(encoded) == 1 and torch.equal(encoded[0], soft.embeddings)
        assert registry.stats().resident_bytes == 3 * geometry.bytes_per_virtual_token(
            4
        )  # charged as its prefix

    with (
        PrefixRegistry(store, geometry, device="cpu", dtype=torch.float32, limits=PrefixLimits()) as plain,
        pytest.raises(PrefixValidationError, match="is a soft prompt, and this cache cannot encode one"),
    ):
        plain.acquire("acme", "soft")


LORA_GEOMETRY = replace(
    GEOMETRY,
    projections=(
        Projection("layers.0.q", 8, 8),
        Projection("layers.0.v", 8, 4),
        Projection("layers.1.q", 8, 8),
    ),
)


def _lora_blob(seed: int, rank: int = 2) -> tuple[bytes, LoraAdapter]:
    generator = torch.Generator().manual_seed(seed)
    modules = {
        p.name: LoraModule(
            torch.randn(rank, p.in_features, generator=generator),
            torch.randn(p.out_features, rank, generator=generator),
            alpha=4.0,
        )
        for p in LORA_GEOMETRY.projections
    }
    lora = LoraAdapter(modules)
    return encode_native(lora, LORA_GEOMETRY), lora


def test_lora_tasks_are_held_budgeted_evicted_and_hot_swapped_like_prefixes(
    store: GatedStore, make_registry: Callable[..., PrefixRegistry]
) -> None:
    """A LoRA task is pinned as itself (no prefix), charged its bytes in the model dtype, evicted when the
    budget needs room, served from the host tier after an eviction, and swaps to and from a prefix."""
    (one, lora_one), (two, _) = _lora_blob(1), _lora_blob(2)
    lora_bytes = lora_one.nbytes // 2  # bfloat16 on the device
    for task, blob in (("one", one), ("two", two)):
        store.put("acme", task, blob, num_virtual_tokens=0, source_format="native", kind="lora")
    registry = PrefixRegistry(
        store,
        LORA_GEOMETRY,
        device="cpu",
        dtype=torch.bfloat16,
        limits=PrefixLimits(),
        budget_bytes=PREFIX_BYTES // 2,  # one LoRA task (176 bytes) or one prefix (256), not two
        host_budget_bytes=4 * lora_bytes,
    )
    try:
        handle = registry.acquire("acme", "one")
        assert handle.prefix is None and handle.num_virtual_tokens == 0 and handle.record.kind == "lora"
        assert isinstance(handle.lora, LoraAdapter) and set(handle.lora.modules) == set(lora_one.modules)
        module = handle.lora.modules["layers.0.v"]
        assert module.a.dtype == torch.bfloat16 and module.alpha == 4.0
        torch.testing.assert_close(module.b, lora_one.modules["layers.0.v"].b.to(torch.bfloat16))
        assert registry.stats().resident_bytes == lora_bytes
        with pytest.raises(PrefixCacheFull):  # "one" is pinned and the budget holds one LoRA
            registry.acquire("acme", "two")
        registry.release(handle)
        registry.release(registry.acquire("acme", "two"))  # evicts "one"
        reads = store.blob_reads
        registry.release(registry.acquire("acme", "one"))  # back from the host tier, not the store
        assert store.blob_reads == reads and registry.stats().evictions == 2

        put(store, "acme", "one", make_blob(3))  # hot swap to a prefix (the GEOMETRY's)
        registry.reconcile()
        swapped = registry.acquire("acme", "one")
        assert swapped.lora is None and swapped.prefix is not None and swapped.record.kind == "prefix"
        registry.release(swapped)
    finally:
        registry.close()
