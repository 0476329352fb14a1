"""The KV pool: every layer's keys and values in fixed-size blocks drawn from one preallocated pool.

Each layer has a keys and a values tensor ``[num_blocks, block_size, kv_heads, head_dim]`` (views of one
storage, so handing out blocks zeroes them in one call); a row of the batch owns a list of block ids (its
block table) and its tokens fill them in order. Block 0 is scratch: padding queries write there and
padding columns of a gathered block table read from there, so it is never handed out. A block is zeroed
when it is handed out (masked slots must hold finite values: a NaN in a masked slot still poisons some
kernels), and the pool's memory is reserved but not touched until blocks are used, so on the CPU
resident memory follows the tokens in use. Freed blocks are handed out
again first, which keeps the touched part of the pool small.
"""

from __future__ import annotations

import torch

from prefix_store.geometry import ModelGeometry

BLOCK_SIZE = 16  # token slots per block
SCRATCH_BLOCK = 0


class PoolExhausted(RuntimeError):
    """More blocks were asked for than the pool has free (the scheduler's budget should prevent it)."""


class KVPool:
    """Fixed-size blocks of keys and values for every layer, and the free list that hands them out."""

    def __init__(
        self,
        geometry: ModelGeometry,
        num_blocks: int,
        device: torch.device,
        dtype: torch.dtype,
        block_size: int = BLOCK_SIZE,
    ) -> None:
        if num_blocks < 2:
            raise ValueError("a KV pool needs a scratch block and at least one more")
        self.block_size = block_size
        shape = (2, geometry.num_layers, num_blocks, block_size, geometry.num_kv_heads, geometry.head_dim)
        self._storage = torch.empty(shape, device=device, dtype=dtype)  # keys, values; one zero-fill a pass
        layers = range(geometry.num_layers)
        self.keys = [self._storage[0, layer] for layer in layers]  # per layer [N, bs, H, D], views
        self.values = [self._storage[1, layer] for layer in layers]
        self._storage[:, :, SCRATCH_BLOCK].zero_()
        self._free = list(range(num_blocks - 1, SCRATCH_BLOCK, -1))  # a stack: pops the lowest id first
        self.device = device
        self.bytes_per_block = self.block_bytes(geometry, dtype, block_size)

    @staticmethod
    def block_bytes(geometry: ModelGeometry, dtype: torch.dtype, block_size: int = BLOCK_SIZE) -> int:
        """Bytes of one block: keys and values of ``block_size`` tokens in every layer."""
        per_token = 2 * geometry.num_layers * geometry.num_kv_heads * geometry.head_dim
        return per_token * block_size * torch.empty((), dtype=dtype).element_size()

    @property
    def num_blocks(self) -> int:
        """Blocks that can be handed out (the scratch block excluded)."""
        return self.keys[0].shape[0] - 1

    @property
    def num_free(self) -> int:
        return len(self._free)

    @property
    def num_used(self) -> int:
        return self.num_blocks - self.num_free

    def blocks_for(self, tokens: int) -> int:
        """Blocks that ``tokens`` slots take."""
        return -(-tokens // self.block_size)

    def allocate(self, count: int) -> list[int]:
        """``count`` zeroed blocks. Raises ``PoolExhausted`` (and hands out none) when fewer are free."""
        if count > len(self._free):
            raise PoolExhausted(f"{count} KV blocks asked for, {len(self._free)} free")
        blocks = [self._free.pop() for _ in range(count)]
        if blocks:
            self._storage.index_fill_(2, torch.tensor(blocks, device=self.device), 0)
        return blocks

    def free(self, blocks: list[int]) -> None:
        """Give blocks back; they are handed out again before any never-used block."""
        self._free.extend(reversed(blocks))

    @torch.no_grad()  # the pool is never part of a graph (a prefix may come from a model being trained)
    def write(self, blocks: list[int], keys: torch.Tensor, values: torch.Tensor) -> None:
        """Fill ``blocks`` in order with ``keys``/``values`` ``[layers, kv_heads, T, head_dim]`` (T ≤ their slots)."""
        tokens = keys.shape[2]
        slots = self.slot_ids(blocks, 0, tokens)
        for layer, (pool_keys, pool_values) in enumerate(zip(self.keys, self.values, strict=True)):
            flat_keys, flat_values = _flat(pool_keys), _flat(pool_values)
            flat_keys.index_copy_(0, slots, keys[layer].transpose(0, 1))
            flat_values.index_copy_(0, slots, values[layer].transpose(0, 1))

    def slot_ids(self, blocks: list[int], start: int, count: int) -> torch.Tensor:
        """Flat slot ids ``[count]`` of the slots ``start, start + 1, …`` of a row holding ``blocks``."""
        offsets = torch.arange(start, start + count)
        table = torch.tensor(blocks, dtype=torch.long)
        return (table[offsets // self.block_size] * self.block_size + offsets % self.block_size).to(
            self.device
        )


def _flat(pool: torch.Tensor) -> torch.Tensor:
    """``[N, bs, H, D]`` → ``[N * bs, H, D]``: one row per slot (a view)."""
    return pool.view(-1, *pool.shape[2:])
