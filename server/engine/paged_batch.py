"""One forward pass over rows whose keys and values live in the KV pool.

A row's block table is its prefix's shared blocks followed by blocks of its own; its own tokens (prompt,
then generated ones) fill its own blocks in order. A forward pass feeds every row its next tokens: a
chunk of its prompt when prefilling, one token when decoding. Inputs are left-padded to the longest
row's, so each row's last input sits in the last column. Each attention layer writes the new keys and
values into their slots (padding into the scratch block), then attends over the rows' block tables
gathered into ``[B, kv_heads, S, head_dim]`` (S = the longest table's slots) with a mask:

- a prefix slot is seen by every query of its row, a masked one (past the prefix, in its last block) by none;
- own slot ``k`` is seen by the row's query with own index ``t`` when ``k ≤ t``;
- a padding query sees what the row's first real query sees (never nothing: no NaN rows).

Attention ignores slot order (position ids are explicit and keys already rotated), so the gaps after a
prefix or at a table's end change no number that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from prefix_store.prefix import Prefix
from server.engine.kv_pool import SCRATCH_BLOCK, KVPool


@dataclass
class RowKV:
    """One row's place in the pool: its prefix's shared blocks, then blocks of its own."""

    prefix: Prefix | None
    prefix_blocks: list[int]
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # own tokens written so far (prompt, then generated)

    @property
    def prefix_length(self) -> int:
        return self.prefix.num_virtual_tokens if self.prefix is not None else 0

    @property
    def next_position(self) -> int:
        """Position id of the row's next token: prompt token k of a P-token prefix row is at P + k."""
        return self.prefix_length + self.length


@dataclass(frozen=True)
class _Addressing:
    """Where one forward pass writes and reads, shared by every layer."""

    write_slots: torch.Tensor  # [B * Q] flat slot of each input (the scratch slot for padding)
    read_blocks: torch.Tensor  # [B * T] block tables, T blocks per row (padded with the scratch block)
    rows: int  # B
    columns: int  # S = T * block_size


class PagedLayer(CacheLayerMixin):
    """One attention layer's view of the pool for one forward pass."""

    is_compileable = False
    is_sliding = False

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, addressing: _Addressing, queries: int
    ) -> None:
        super().__init__()
        self.pool_keys, self.pool_values = keys, values  # [N, bs, H, D]
        self.addressing, self.queries = addressing, queries
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("the KV pool is allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``[B, H, Q, D]`` states into their slots; return the rows' tables ``[B, H, S, D]``."""
        a = self.addressing
        return self._write_and_read(self.pool_keys, key_states, a), self._write_and_read(
            self.pool_values, value_states, a
        )

    @staticmethod
    def _write_and_read(pool: torch.Tensor, states: torch.Tensor, a: _Addressing) -> torch.Tensor:
        heads, dim = pool.shape[2], pool.shape[3]
        pool.view(-1, heads, dim).index_copy_(
            0, a.write_slots, states.transpose(1, 2).reshape(-1, heads, dim)
        )
        gathered = pool.index_select(0, a.read_blocks)  # [B * T, bs, H, D]
        return gathered.view(a.rows, a.columns, heads, dim).transpose(1, 2)

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.addressing.columns, 0

    def get_seq_length(self) -> int:
        return self.addressing.columns - self.queries

    def get_max_length(self) -> int:
        return -1


class PagedBatch:
    """The inputs of one forward pass over ``rows`` (``ModelInputs``); ``advance`` after it ran."""

    def __init__(self, pool: KVPool, rows: Sequence[RowKV], inputs: Sequence[Sequence[int]]) -> None:
        """``inputs[i]``: the tokens row ``i`` feeds (at least one); its blocks must already hold them."""
        if not rows or len(rows) != len(inputs) or any(len(tokens) == 0 for tokens in inputs):
            raise ValueError("every row of a forward pass feeds at least one token")
        self.rows = list(rows)
        self.fed = [len(tokens) for tokens in inputs]
        bs, device = pool.block_size, pool.device
        batch, queries = len(rows), max(self.fed)
        tables = max(len(row.prefix_blocks) + len(row.blocks) for row in rows)
        own_tables = max(len(row.blocks) for row in rows)

        input_ids = torch.zeros(batch, queries, dtype=torch.long)
        real = torch.zeros(batch, queries, dtype=torch.bool)
        read_blocks = torch.full((batch, tables), SCRATCH_BLOCK, dtype=torch.long)
        own_blocks = torch.full((batch, own_tables), SCRATCH_BLOCK, dtype=torch.long)
        for i, (row, tokens) in enumerate(zip(rows, inputs, strict=True)):
            if row.length + len(tokens) > len(row.blocks) * bs:
                raise ValueError("a row's blocks must hold its new tokens before its forward pass")
            input_ids[i, queries - len(tokens) :] = torch.tensor(list(tokens), dtype=torch.long)
            real[i, queries - len(tokens) :] = True
            read_blocks[i, : len(row.prefix_blocks) + len(row.blocks)] = torch.tensor(
                row.prefix_blocks + row.blocks, dtype=torch.long
            )
            own_blocks[i, : len(row.blocks)] = torch.tensor(row.blocks, dtype=torch.long)

        lengths = torch.tensor([row.length for row in rows])[:, None]  # [B, 1]
        pads = (queries - torch.tensor(self.fed))[:, None]  # [B, 1]
        own_index = (lengths + torch.arange(queries)[None] - pads).clamp(min=lengths)  # [B, Q]: pads → first
        write_slots = own_blocks.gather(1, own_index // bs) * bs + own_index % bs
        write_slots = write_slots.masked_fill(~real, SCRATCH_BLOCK * bs)
        prefix_lengths = torch.tensor([row.prefix_length for row in rows])[:, None]
        self.input_positions = (prefix_lengths + own_index).masked_fill(~real, 0).to(device)  # [B, Q]
        self.input_ids = input_ids.to(device)  # [B, Q]

        columns = torch.arange(tables * bs)[None]  # [1, S]
        own_column = columns - torch.tensor([len(row.prefix_blocks) * bs for row in rows])[:, None]  # [B, S]
        prefix_seen = columns < prefix_lengths  # [B, S]
        own_seen = (own_column[:, None, :] >= 0) & (own_column[:, None, :] <= own_index[:, :, None])
        self._allowed = (prefix_seen[:, None, :] | own_seen).to(device)  # [B, Q, S]
        self._addressing = _Addressing(
            write_slots=write_slots.view(-1).to(device),
            read_blocks=read_blocks.view(-1).to(device),
            rows=batch,
            columns=tables * bs,
        )
        self.cache = Cache(
            layers=[
                PagedLayer(keys, values, self._addressing, queries)
                for keys, values in zip(pool.keys, pool.values, strict=True)
            ]
        )

    def __len__(self) -> int:
        return len(self.rows)

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``[B, 1, Q, S]``: 0 where a query may look, dtype-min elsewhere."""
        mask = torch.zeros(self._allowed.shape, dtype=dtype, device=self._allowed.device)
        mask.masked_fill_(~self._allowed, torch.finfo(dtype).min)
        return mask[:, None]

    def advance(self) -> None:
        """The forward pass wrote every row's inputs: count them as cached."""
        for row, fed in zip(self.rows, self.fed, strict=True):
            row.length += fed
