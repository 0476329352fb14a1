"""A task's prefix held once in the KV pool: read-only blocks shared by every row that uses it.

The first row with a prefix copies its keys and values into blocks; later rows with the same prefix (the
same ``Prefix`` object: the registry hands out one per task version, so a hot swap gets blocks of its
own) point their block tables at those blocks. A count of the rows using them frees the blocks when the
last one leaves, like the registry's pins. Rows never write into these blocks: a row's own tokens start
in a block of its own, so a prefix's last, partly filled block leaves masked slots behind it.
"""

from __future__ import annotations

from dataclasses import dataclass

from prefix_store.prefix import Prefix
from server.engine.kv_pool import KVPool


@dataclass
class _Shared:
    prefix: Prefix  # held so that its id is not reused while the blocks exist
    blocks: list[int]
    rows: int


class SharedPrefixBlocks:
    """Prefixes in the pool, each once, with the number of rows using each."""

    def __init__(self, pool: KVPool) -> None:
        self.pool = pool
        self._shared: dict[int, _Shared] = {}  # by id(prefix)

    def acquire(self, prefix: Prefix) -> list[int]:
        """The blocks holding ``prefix`` (written on first use); the caller must ``release`` it once."""
        shared = self._shared.get(id(prefix))
        if shared is None:
            blocks = self.pool.allocate(self.pool.blocks_for(prefix.num_virtual_tokens))
            self.pool.write(blocks, prefix.keys, prefix.values)
            shared = self._shared[id(prefix)] = _Shared(prefix, blocks, rows=0)
        shared.rows += 1
        return shared.blocks

    def release(self, prefix: Prefix) -> None:
        """One row no longer uses ``prefix``; its blocks go back to the pool after the last."""
        shared = self._shared[id(prefix)]
        shared.rows -= 1
        if shared.rows == 0:
            del self._shared[id(prefix)]
            self.pool.free(shared.blocks)

    @property
    def num_blocks(self) -> int:
        """Blocks holding prefixes."""
        return sum(len(shared.blocks) for shared in self._shared.values())

    @property
    def num_prefixes(self) -> int:
        return len(self._shared)

    @property
    def num_rows(self) -> int:
        """Rows reading a shared prefix."""
        return sum(shared.rows for shared in self._shared.values())
