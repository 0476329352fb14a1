"""The engine's paged KV cache: the pool, the shared prefix blocks, and the rows' block tables."""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from server.engine.kv_pool import BLOCK_SIZE, KVPool
from server.engine.paged_batch import PagedBatch, RowKV
from server.engine.prefix_blocks import SharedPrefixBlocks


@dataclass(frozen=True)
class KVCacheStats:
    """What the pool holds now (for gauges and the admin API)."""

    bytes_used: int
    bytes_total: int
    blocks_used: int
    blocks_total: int
    block_size: int
    shared_prefix_blocks: int  # blocks holding prefixes, each prefix once
    shared_prefixes: int
    rows_sharing_prefixes: int


def blocks_for_reservations(max_tokens: int, max_rows: int, block_size: int = BLOCK_SIZE) -> int:
    """Pool blocks that ``max_tokens`` reserved tokens over at most ``max_rows`` rows (the scheduler's
    budget, each row's prefix counted in full) can never run out of: each row's own blocks and each
    distinct prefix round up to whole blocks, one partial block each at most; plus the scratch block."""
    return -(-max_tokens // block_size) + 2 * max_rows + 1


def reservations_held(num_blocks: int, max_rows: int, block_size: int = BLOCK_SIZE) -> int:
    """The most reserved tokens a pool of ``num_blocks`` holds for ``max_rows`` rows (the inverse)."""
    return (num_blocks - 1 - 2 * max_rows) * block_size


class PagedKVCache:
    """Rows' keys and values in one pool of blocks; a prefix is held once for all rows that use it."""

    def __init__(
        self,
        geometry: ModelGeometry,
        *,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        self.pool = KVPool(geometry, num_blocks, device, dtype, block_size)
        self.prefixes = SharedPrefixBlocks(self.pool)

    def open(self, prefix: Prefix | None, source: tuple[torch.Tensor, torch.Tensor] | None = None) -> RowKV:
        """A new row with ``prefix`` (None: the base model alone) and no tokens yet; ``source``: an
        encoder-decoder row's cross-attention keys and values ``[layers, heads, S, head_dim]``, written into
        blocks of its own."""
        source_blocks, source_length = [], 0
        if source is not None:
            source_length = source[0].shape[2]
            source_blocks = self.pool.allocate(self.pool.blocks_for(source_length))
            self.pool.write(source_blocks, *source)
        blocks = self.prefixes.acquire(prefix) if prefix is not None else []
        return RowKV(prefix, blocks, source_blocks=source_blocks, source_length=source_length)

    def close(self, row: RowKV) -> None:
        """The row has left: its blocks go back, and its prefix's once no row uses it."""
        self.pool.free(row.blocks + row.source_blocks)
        row.blocks, row.source_blocks = [], []
        if row.prefix is not None:
            self.prefixes.release(row.prefix)
            row.prefix_blocks = []

    def batch(self, rows: Sequence[RowKV], inputs: Sequence[Sequence[int]]) -> PagedBatch:
        """A forward pass feeding ``inputs[i]`` to ``rows[i]``, blocks for the new tokens handed out first."""
        needed = [
            self.pool.blocks_for(row.length + len(tokens)) - len(row.blocks)
            for row, tokens in zip(rows, inputs, strict=True)
        ]
        blocks = iter(self.pool.allocate(sum(n for n in needed if n > 0)))  # one zero-fill for the pass
        for row, count in zip(rows, needed, strict=True):
            row.blocks.extend(next(blocks) for _ in range(count))
        return PagedBatch(self.pool, rows, inputs)

    def stats(self) -> KVCacheStats:
        pool = self.pool
        return KVCacheStats(
            bytes_used=pool.num_used * pool.bytes_per_block,
            bytes_total=pool.num_blocks * pool.bytes_per_block,
            blocks_used=pool.num_used,
            blocks_total=pool.num_blocks,
            block_size=pool.block_size,
            shared_prefix_blocks=self.prefixes.num_blocks,
            shared_prefixes=self.prefixes.num_prefixes,
            rows_sharing_prefixes=self.prefixes.num_rows,
        )
