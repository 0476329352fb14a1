"""The engine's paged KV cache: the pool and its block manager, and the rows' block tables.

A row's table is its task's prefix blocks (shared, read-only: named from the prefix's content, so every
row of that task version reads the same blocks, and they stay cached after the last row leaves) and then
blocks of its own: first the cached blocks its prompt found by name (read-only, shared), then blocks it
fills. With prompt caching each own block is named once full (``name_full_blocks``), so a later row with
the same root and the same tokens finds it (``block_manager``).
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch

from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix
from server.engine.block_manager import (
    BlockManager,
    BlockName,
    RowChain,
    chain_names,
    indexed_name,
    root_name,
)
from server.engine.kv_pool import BLOCK_SIZE, KVPool
from server.engine.paged_batch import PagedBatch, RowKV


@dataclass(frozen=True)
class KVCacheStats:
    """What the pool holds now (for gauges and the admin API)."""

    bytes_used: int  # held by rows (cached blocks no row holds are not counted: they are reclaimable)
    bytes_total: int
    blocks_used: int
    blocks_total: int
    block_size: int
    shared_prefix_blocks: int  # blocks holding prefixes that rows read, each prefix once
    shared_prefixes: int
    rows_sharing_prefixes: int
    cached_blocks: int  # named blocks no row holds, kept for a later hit
    evictions: int  # cached blocks taken back for room, since start


def blocks_for_reservations(max_tokens: int, max_rows: int, block_size: int = BLOCK_SIZE) -> int:
    """Pool blocks that ``max_tokens`` reserved tokens over at most ``max_rows`` rows (the scheduler's
    budget, a prefix counted once for the rows of one tenant that share it) can never run out of: each
    row's own blocks and each distinct prefix round up to whole blocks, one partial block each at most;
    plus the scratch block."""
    return -(-max_tokens // block_size) + 2 * max_rows + 1


def reservations_held(num_blocks: int, max_rows: int, block_size: int = BLOCK_SIZE) -> int:
    """The most reserved tokens a pool of ``num_blocks`` holds for ``max_rows`` rows (the inverse)."""
    return (num_blocks - 1 - 2 * max_rows) * block_size


@dataclass
class _PrefixInUse:
    blocks: int
    rows: int


class PagedKVCache:
    """Rows' keys and values in one pool of blocks; a prefix is held once for all rows that use it, and
    with ``prompt_cache`` full blocks are kept by name after their rows leave."""

    def __init__(
        self,
        geometry: ModelGeometry,
        *,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
        prompt_cache: bool = True,
    ) -> None:
        self.pool = KVPool(geometry, num_blocks, device, dtype, block_size)
        self.blocks = BlockManager(self.pool, keep=prompt_cache)
        self.prompt_cache = prompt_cache
        self._prefixes: dict[BlockName, _PrefixInUse] = {}  # prefixes rows read now, by name
        self._computing: dict[BlockName, RowKV] = {}  # prompt blocks a row is computing now, by their name

    def open(
        self,
        prefix: Prefix | None,
        source: tuple[torch.Tensor, torch.Tensor] | None = None,
        *,
        prefix_name: BlockName | None = None,
        tenant: str = "",
        chain: RowChain | None = None,
        prompt: Sequence[int] = (),
    ) -> RowKV:
        """A new row with ``prefix`` (None: the base model alone; its blocks named ``prefix_name``, by default
        from its content) and, for
        an encoder-decoder, ``source``: its cross-attention keys and values ``[layers, heads, S, head_dim]``,
        written into blocks of its own. With ``chain`` (prompt caching), the longest run of ``prompt``'s full
        blocks found cached is the row's already (all but its last token: that one is always computed)."""
        source_blocks, source_length = [], 0
        if source is not None:
            source_length = source[0].shape[2]
            source_blocks = self.blocks.allocate(self.pool.blocks_for(source_length))
            self.pool.write(source_blocks, *source)
        prefix_blocks = []
        if prefix is not None:
            prefix_name = prefix_name or root_name("prefix", prefix.digest)  # unnamed: by its content alone
            prefix_blocks = self._prefix_blocks(prefix, prefix_name, tenant)
        row = RowKV(prefix, prefix_blocks, source_blocks=source_blocks, source_length=source_length)
        row.prefix_name, row.chain = prefix_name, chain
        if chain is not None and self.prompt_cache:
            names = self._prompt_names(chain, prompt)
            row.blocks = self.blocks.find(names)
            row.length = len(row.blocks) * self.pool.block_size
            chain.names, chain.tokens = names[: len(row.blocks)], list(prompt[: row.length])
            row.computing = [name for name in names[len(row.blocks) :] if name not in self._computing]
            self._computing.update(dict.fromkeys(row.computing, row))
        return row

    def computed_by_another(self, chain: RowChain, prompt: Sequence[int]) -> bool:
        """Whether the first of ``prompt``'s full blocks that is not cached is being computed by a row now:
        a row that waits for it finds it cached instead of computing it again (``n`` samples of one
        prompt, many users of one system prompt arriving together)."""
        for name in self._prompt_names(chain, prompt):
            if not self.blocks.has(name):
                return name in self._computing
        return False

    def _prompt_names(self, chain: RowChain, prompt: Sequence[int]) -> list[BlockName]:
        """The names of the full blocks of ``prompt`` a row may find cached: all but its last token's."""
        reusable = (len(prompt) - 1) // self.pool.block_size * self.pool.block_size
        return chain_names(chain.root, prompt[:reusable], self.pool.block_size)

    def close(self, row: RowKV) -> None:
        """The row has left: its blocks go back (named ones stay cached), its prefix's once no row uses it."""
        self.blocks.release(row.prefix_blocks + row.blocks + row.source_blocks)
        for name in row.computing:
            if self._computing.get(name) is row:
                del self._computing[name]
        if row.prefix_name is not None:
            in_use = self._prefixes[row.prefix_name]
            in_use.rows -= 1
            if in_use.rows == 0:
                del self._prefixes[row.prefix_name]
        row.prefix_blocks, row.blocks, row.source_blocks = [], [], []

    def batch(self, rows: Sequence[RowKV], inputs: Sequence[Sequence[int]]) -> PagedBatch:
        """A forward pass feeding ``inputs[i]`` to ``rows[i]``, blocks for the new tokens handed out first."""
        needed = [
            self.pool.blocks_for(row.length + len(tokens)) - len(row.blocks)
            for row, tokens in zip(rows, inputs, strict=True)
        ]
        blocks = iter(self.blocks.allocate(sum(n for n in needed if n > 0)))  # one zero-fill for the pass
        for row, count in zip(rows, needed, strict=True):
            row.blocks.extend(next(blocks) for _ in range(count))
        return PagedBatch(self.pool, rows, inputs)

    def name_full_blocks(self, rows: Sequence[RowKV]) -> None:
        """After a pass: name the own blocks the rows have filled (prompt caching), for later rows to find."""
        if not self.prompt_cache:
            return
        for row in rows:
            chain = row.chain
            while chain is not None and (full := chain.next_full_block(self.pool.block_size)) is not None:
                index, name = full
                self.blocks.name(row.blocks[index], name, chain.tenant)
                chain.names.append(name)
                if self._computing.get(name) is row:
                    del self._computing[name]

    def forget(self, tenant: str) -> int:
        """No later row of ``tenant`` finds its blocks cached (the admin's reset); returns how many were."""
        return self.blocks.forget(tenant)

    def stats(self) -> KVCacheStats:
        pool, cache = self.pool, self.blocks.stats()
        used = pool.num_used - cache.cached_blocks
        return KVCacheStats(
            bytes_used=used * pool.bytes_per_block,
            bytes_total=pool.num_blocks * pool.bytes_per_block,
            blocks_used=used,
            blocks_total=pool.num_blocks,
            block_size=pool.block_size,
            shared_prefix_blocks=sum(in_use.blocks for in_use in self._prefixes.values()),
            shared_prefixes=len(self._prefixes),
            rows_sharing_prefixes=sum(in_use.rows for in_use in self._prefixes.values()),
            cached_blocks=cache.cached_blocks,
            evictions=cache.evictions,
        )

    def _prefix_blocks(self, prefix: Prefix, name: BlockName, tenant: str) -> list[int]:
        """The blocks holding ``prefix``, each found by name or written now (block ``i`` holds its virtual
        tokens ``i·bs …``); held once more for the row."""
        bs, blocks = self.pool.block_size, []
        for index in range(self.pool.blocks_for(prefix.num_virtual_tokens)):
            block_name = indexed_name(name, index)
            block = self.blocks.lookup(block_name)
            if block is None:
                (block,) = self.blocks.allocate(1)
                part = slice(index * bs, (index + 1) * bs)
                self.pool.write([block], prefix.keys[:, :, part], prefix.values[:, :, part])
                self.blocks.name(block, block_name, tenant)
            blocks.append(block)
        in_use = self._prefixes.setdefault(name, _PrefixInUse(len(blocks), 0))
        in_use.rows += 1
        return blocks
