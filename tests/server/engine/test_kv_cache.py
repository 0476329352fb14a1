"""The paged KV cache: blocks from one pool, prefixes held once, and forward passes over block tables that
compute what the dense layout computes."""

from __future__ import annotations

import pytest
import torch

from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.kv_cache import PagedKVCache, blocks_for_reservations, reservations_held
from server.engine.kv_pool import KVPool, PoolExhausted
from server.engine.paged_batch import PagedBatch
from server.engine.runner import ModelRunner
from server.engine.scheduler import SchedulerConfig
from server.training.prefill_batch import BatchRow, PrefillBatch
from tests.server.engine.helpers import random_prefix


def _cache(base: BaseModel, num_blocks: int = 64) -> PagedKVCache:
    return PagedKVCache(base.geometry, num_blocks=num_blocks, device=base.device, dtype=base.dtype)


def test_the_pool_hands_out_zeroed_blocks_lowest_first_and_reuses_freed_ones(llama_base: BaseModel) -> None:
    pool = KVPool(llama_base.geometry, num_blocks=6, device=llama_base.device, dtype=llama_base.dtype)
    assert pool.num_blocks == 5 and pool.allocate(2) == [1, 2]
    for keys in pool.keys:
        keys[1:3] = 7.0  # a row wrote into them
    pool.free([1, 2])
    again = pool.allocate(3)
    assert sorted(again) == [1, 2, 3] and pool.num_used == 3
    assert all(bool((keys[again] == 0).all()) for keys in pool.keys + pool.values)  # zeroed, not stale
    with pytest.raises(PoolExhausted):
        pool.allocate(3)
    assert pool.num_free == 2  # a refused allocation hands out nothing
    assert (
        pool.bytes_per_block
        == 2
        * llama_base.geometry.num_layers
        * 16
        * llama_base.geometry.num_kv_heads
        * (llama_base.geometry.head_dim * 4)
    )


def test_rows_of_one_prefix_share_its_blocks_until_the_last_leaves(llama_base: BaseModel) -> None:
    kv = _cache(llama_base)
    prefix, swapped = random_prefix(llama_base, 20, seed=1), random_prefix(llama_base, 20, seed=2)
    rows = [kv.open(prefix) for _ in range(8)]
    assert all(row.prefix_blocks == rows[0].prefix_blocks for row in rows) and len(rows[0].prefix_blocks) == 2
    stats = kv.stats()
    assert (stats.shared_prefix_blocks, stats.shared_prefixes, stats.rows_sharing_prefixes) == (2, 1, 8)
    assert stats.blocks_used == 2 and stats.bytes_used == 2 * kv.pool.bytes_per_block  # 8 rows, one copy
    other = kv.open(swapped)  # a new version of the task is another prefix: blocks of its own
    assert set(other.prefix_blocks).isdisjoint(rows[0].prefix_blocks)
    for layer in range(llama_base.geometry.num_layers):
        stored = kv.pool.keys[layer][rows[0].prefix_blocks].flatten(0, 1)[:20]  # [P, H, D]
        assert torch.equal(stored, prefix.keys[layer].transpose(0, 1))
    for row in [*rows, other]:
        kv.close(row)
    assert kv.stats().blocks_used == 0 and kv.stats().shared_prefixes == 0


def _dense_logits(base: BaseModel, prompt: list[int], prefix) -> torch.Tensor:
    batch = PrefillBatch.from_rows([BatchRow("r", prompt, prefix)], base.geometry, base.device, base.dtype)
    return ModelRunner(base).forward(batch)[0]


@pytest.mark.parametrize("prefix_length", [0, 5, 16])
def test_chunked_paged_forwards_compute_the_dense_logits(base: BaseModel, prefix_length: int) -> None:
    """A prompt fed in chunks of 7 (beside another row) and then decoded token by token gives the dense
    layout's logits at every step, on every architecture."""
    prefix = random_prefix(base, prefix_length, seed=3) if prefix_length else None
    prompt = list(range(3, 40))
    neighbour_prompt = list(range(50, 53))
    kv, runner = _cache(base), ModelRunner(base)
    row, neighbour = kv.open(prefix), kv.open(random_prefix(base, 3, seed=4))
    logits = None
    for start in range(0, len(prompt), 7):
        chunk = prompt[start : start + 7]
        batch = kv.batch([row, neighbour], [chunk, neighbour_prompt[:1] if start == 0 else [9]])
        logits = runner.forward(batch)[0]
        batch.advance()
    torch.testing.assert_close(logits, _dense_logits(base, prompt, prefix), rtol=1e-4, atol=1e-4)
    history = list(prompt)
    for token in (11, 12, 13):
        batch = kv.batch([row], [[token]])
        logits = runner.forward(batch)[0]
        batch.advance()
        history.append(token)
        torch.testing.assert_close(logits, _dense_logits(base, history, prefix), rtol=1e-4, atol=1e-4)
    assert row.length == len(history) and len(row.blocks) == kv.pool.blocks_for(len(history))


def test_a_forward_pass_needs_blocks_for_its_tokens(llama_base: BaseModel) -> None:
    kv = _cache(llama_base)
    row = kv.open(None)
    with pytest.raises(ValueError, match="blocks"):
        PagedBatch(kv.pool, [row], [[1, 2]])
    with pytest.raises(ValueError):
        kv.batch([row], [[]])


def test_a_kv_budget_in_bytes_holds_the_scheduler_to_what_the_pool_holds(llama_base: BaseModel) -> None:
    block = KVPool.block_bytes(llama_base.geometry, llama_base.dtype)
    config = SchedulerConfig(max_batch_size=4, max_batch_tokens=32_768)
    core = EngineCore(llama_base, config, kv_cache_bytes=100 * block)
    assert core.kv.pool.num_blocks == 99
    assert core.scheduler.config.max_batch_tokens == reservations_held(100, 4) == (100 - 1 - 8) * 16
    assert blocks_for_reservations(reservations_held(100, 4), 4) == 100  # the two are inverses
    with pytest.raises(ValueError, match="rows need more than"):
        EngineCore(llama_base, config, kv_cache_bytes=5 * block)


def test_rows_of_very_different_lengths_attend_in_groups_of_their_own(base: BaseModel) -> None:
    """A decode pass holding a 230-token row beside short ones: the long row gets an attention group of its
    own (the short rows do not attend over its columns), and every row's logits are the dense layout's."""
    kv, runner = _cache(base, num_blocks=128), ModelRunner(base)
    prompts = [[5 + i % 150 for i in range(230)], [7, 8, 9], list(range(20, 31)), [4]]
    prefixes = [None, random_prefix(base, 5, seed=1), None, random_prefix(base, 2, seed=2)]
    rows = [kv.open(prefix) for prefix in prefixes]
    for row, prompt in zip(rows, prompts, strict=True):
        batch = kv.batch([row], [prompt])
        runner.forward(batch)
        batch.advance()
    batch = kv.batch(rows, [[11]] * 4)
    assert len(batch.paged.groups) == 2 and sorted(g.size for g in batch.paged.groups) == [1, 3]
    logits = runner.forward(batch)
    for i, (prompt, prefix) in enumerate(zip(prompts, prefixes, strict=True)):
        torch.testing.assert_close(
            logits[i], _dense_logits(base, [*prompt, 11], prefix), rtol=1e-4, atol=1e-4
        )
