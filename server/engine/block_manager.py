"""The KV pool's blocks and what they hold: held by rows (counted), named by their content, and kept after
their last row leaves until a new block needs the room (automatic prompt caching).

A block is **named** by what determines every number in it. A row's chain starts from its **root**:
the base model, the tenant (a server-side salt: nothing is shared across tenants), the conditioning's
content (the task version's sha256, a soft prompt's likewise, an in-process prefix's digest, or "base";
never a task's name, which a hot swap keeps) and an optional per-request ``cache_salt``. Each full block
of the row's own tokens is named from the previous block's name and its token ids, so a name stands for
the whole conditioned sequence up to the block's end: two rows whose names agree hold the same keys and
values there. A task's prefix blocks are named from the root without the salt and the block's index.

Blocks a row fills are named as they fill; when no row holds a named block any more it stays in the pool,
least recently used first in line for eviction; a block is handed out from the free list first, then by
evicting. Admission looks a prompt's full blocks up by name and holds the longest cached run (the last
prompt token is always computed, so the row gets its logits).
"""

from __future__ import annotations

import hashlib
from array import array
from collections import OrderedDict
from collections.abc import Sequence
from dataclasses import dataclass

from server.engine.kv_pool import KVPool

BlockName = bytes  # a sha256 digest


def root_name(*parts: str) -> BlockName:
    """The name a row's chain starts from: what conditions its keys and values (model, tenant, …)."""
    return hashlib.sha256("\x1f".join(parts).encode()).digest()


def next_name(previous: BlockName, tokens: Sequence[int]) -> BlockName:
    """The name of a full block of ``tokens`` after the block (or root) named ``previous``."""
    return hashlib.sha256(previous + array("q", tokens).tobytes()).digest()


def chain_names(root: BlockName, tokens: Sequence[int], block_size: int) -> list[BlockName]:
    """The names of the full blocks ``tokens`` fill, in order, from ``root``."""
    names, previous = [], root
    for start in range(0, len(tokens) - block_size + 1, block_size):
        previous = next_name(previous, tokens[start : start + block_size])
        names.append(previous)
    return names


def indexed_name(root: BlockName, index: int) -> BlockName:
    """The name of block ``index`` of what ``root`` names as a whole (a task's prefix)."""
    return hashlib.sha256(root + index.to_bytes(4, "little")).digest()


@dataclass
class RowChain:
    """How a row's own full blocks are named: from ``root``, for ``tenant``; the names so far and the own
    tokens written (from which the next full block's name comes)."""

    root: BlockName
    tenant: str
    names: list[BlockName]
    tokens: list[int]

    def next_full_block(self, block_size: int) -> tuple[int, BlockName] | None:
        """The index and name of the first own block that is full but not named yet, if any."""
        index = len(self.names)
        if (index + 1) * block_size > len(self.tokens):
            return None
        previous = self.names[-1] if self.names else self.root
        return index, next_name(previous, self.tokens[index * block_size : (index + 1) * block_size])


@dataclass(frozen=True)
class BlockCacheStats:
    cached_blocks: int  # named blocks no row holds: kept for a later hit, evicted first
    named_blocks: int  # named blocks, held or not
    evictions: int  # named blocks taken back to make room, since start


class BlockManager:
    """Hands out the pool's blocks, counts the rows holding each, and keeps named blocks for reuse.

    With ``keep`` off (prompt caching off) a block goes back to the pool when its last row leaves; names
    still let rows running together share a task's prefix blocks. Used from the engine's thread only."""

    def __init__(self, pool: KVPool, *, keep: bool = True) -> None:
        self.pool = pool
        self.keep = keep
        self._holders: dict[int, int] = {}  # block → rows holding it
        self._named: dict[BlockName, int] = {}  # name → block
        self._names: dict[int, tuple[BlockName, str]] = {}  # block → (its name, the tenant it was named for)
        self._cached: OrderedDict[int, None] = OrderedDict()  # named blocks no row holds, least recent first
        self.evictions = 0

    def allocate(self, count: int) -> list[int]:
        """``count`` zeroed blocks, held once: free ones first, then the least recently used cached ones.
        Raises ``PoolExhausted`` (and hands out none) when even eviction cannot make the room."""
        while self.pool.num_free < count and self._cached:
            block, _ = self._cached.popitem(last=False)
            self._unname(block)
            self.pool.free([block])
            self.evictions += 1
        blocks = self.pool.allocate(count)
        for block in blocks:
            self._holders[block] = 1
        return blocks

    def find(self, names: Sequence[BlockName]) -> list[int]:
        """The blocks named ``names[0]``, ``names[1]``, … up to the first one missing, each held once more."""
        blocks = []
        for name in names:
            block = self._named.get(name)
            if block is None:
                break
            blocks.append(block)
        for block in blocks:
            self._hold(block)
        return blocks

    def has(self, name: BlockName) -> bool:
        """Whether a block is named ``name``."""
        return name in self._named

    def lookup(self, name: BlockName) -> int | None:
        """The block named ``name``, held once more; None if no block has that name."""
        block = self._named.get(name)
        if block is not None:
            self._hold(block)
        return block

    def name(self, block: int, name: BlockName, tenant: str) -> None:
        """``block`` (held, full) holds what ``name`` names. A name already given keeps its first block
        (this one then goes back to the pool when its rows leave)."""
        if name not in self._named and block not in self._names:
            self._named[name] = block
            self._names[block] = (name, tenant)

    def release(self, blocks: Sequence[int]) -> None:
        """One row no longer holds ``blocks``: the last row's leave named ones cached, the rest free."""
        for block in blocks:
            holders = self._holders[block] - 1
            if holders:
                self._holders[block] = holders
                continue
            del self._holders[block]
            if self.keep and block in self._names:
                self._cached[block] = None
            else:
                self._unname(block)
                self.pool.free([block])

    def forget(self, tenant: str) -> int:
        """Drop the names of ``tenant``'s blocks (no later request hits them); cached ones go back to the
        pool at once, held ones when their rows leave. Returns how many blocks were named."""
        blocks = [block for block, (_, owner) in self._names.items() if owner == tenant]
        for block in blocks:
            self._unname(block)
            if block in self._cached:
                del self._cached[block]
                self.pool.free([block])
        return len(blocks)

    def named_blocks(self, tenant: str) -> int:
        """How many blocks are named for ``tenant`` (held by its rows, or cached)."""
        return sum(owner == tenant for _, owner in self._names.values())

    def stats(self) -> BlockCacheStats:
        return BlockCacheStats(len(self._cached), len(self._names), self.evictions)

    def _hold(self, block: int) -> None:
        self._holders[block] = self._holders.get(block, 0) + 1
        self._cached.pop(block, None)

    def _unname(self, block: int) -> None:
        named = self._names.pop(block, None)
        if named is not None:
            del self._named[named[0]]
