"""One forward pass over rows whose keys and values live in the KV pool.

A row's block table is its prefix's shared blocks followed by blocks of its own; its own tokens (prompt,
then generated ones) fill its own blocks in order. A forward pass feeds every row its next tokens: a
chunk of its prompt when prefilling, one token when decoding. Inputs are left-padded to the longest
row's, so each row's last input sits in the last column. Each attention layer writes the new keys and
values into their slots (padding into the scratch block); ``paged_attention`` then reads them back, row
group by row group (rows of similar table length together), with a mask per group:

- a prefix slot is seen by every query of its row, a masked one (past the prefix, in its last block) by none;
- own slot ``k`` is seen by the row's query with own index ``t`` when ``k ≤ t``;
- a padding query sees what the row's first real query sees (never nothing: no NaN rows);
- in a local (sliding-window) layer, only slots less than the window behind the query in cache positions
  (the prefix at 0…P-1, own slot ``k`` at P + ``k``), as the model's own mask does under PEFT.

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
from server.engine.paged_attention import AttentionGroup, PagedAttention
from server.engine.prefill_groups import length_groups


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
    def table(self) -> list[int]:
        """The row's block table: prefix blocks, then its own."""
        return self.prefix_blocks + self.blocks


class PagedLayer(CacheLayerMixin):
    """One attention layer's part of a forward pass: the new keys and values go into their pool slots
    (``paged_attention`` reads the pool; the states are returned only for the model's bookkeeping)."""

    is_compileable = False
    is_sliding = False

    def __init__(
        self, keys: torch.Tensor, values: torch.Tensor, write_slots: torch.Tensor, columns: int
    ) -> None:
        super().__init__()
        self.pool_keys, self.pool_values = keys, values  # [N, bs, H, D]
        self.write_slots, self.columns = write_slots, columns
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("the KV pool is allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write the new ``[B, H, Q, D]`` states into their slots."""
        for pool, states in ((self.pool_keys, key_states), (self.pool_values, value_states)):
            heads, dim = pool.shape[2], pool.shape[3]
            pool.view(-1, heads, dim).index_copy_(
                0, self.write_slots, states.transpose(1, 2).reshape(-1, heads, dim)
            )
        return key_states, value_states

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.columns, 0

    def get_seq_length(self) -> int:
        return self.columns

    def get_max_length(self) -> int:
        return -1


class PagedBatch:
    """The inputs of one forward pass over ``rows`` (``ModelInputs``); ``advance`` after it ran."""

    def __init__(self, pool: KVPool, rows: Sequence[RowKV], inputs: Sequence[Sequence[int]]) -> None:
        """``inputs[i]``: the tokens row ``i`` feeds (at least one); its blocks must already hold them."""
        if not rows or len(rows) != len(inputs) or any(len(tokens) == 0 for tokens in inputs):
            raise ValueError("every row of a forward pass feeds at least one token")
        bs = pool.block_size
        if any(
            row.length + len(tokens) > len(row.blocks) * bs for row, tokens in zip(rows, inputs, strict=True)
        ):
            raise ValueError("a row's blocks must hold its new tokens before its forward pass")
        self.rows, self.fed = list(rows), [len(tokens) for tokens in inputs]
        batch, queries, device = len(rows), max(self.fed), pool.device
        self.input_ids = torch.tensor(
            [[0] * (queries - len(tokens)) + list(tokens) for tokens in inputs], device=device
        )  # [B, Q]
        # own index of each input: real ones count on from the row's length, padding repeats the first
        starts = [row.length for row in rows]
        own_index = torch.tensor(
            [
                [start + max(0, q - (queries - fed)) for q in range(queries)]
                for start, fed in zip(starts, self.fed, strict=True)
            ]
        )  # [B, Q]
        real = torch.tensor([[q >= queries - fed for q in range(queries)] for fed in self.fed])  # [B, Q]
        own_width = max(len(row.blocks) for row in rows)
        own_blocks = torch.tensor(
            [row.blocks + [SCRATCH_BLOCK] * (own_width - len(row.blocks)) for row in rows]
        )
        write_slots = (own_blocks.gather(1, own_index // bs) * bs + own_index % bs).masked_fill(~real, 0)
        prefix_lengths = torch.tensor([row.prefix_length for row in rows])[:, None]  # [B, 1]
        self.input_positions = (prefix_lengths + own_index).masked_fill(~real, 0).to(device)  # [B, Q]

        tables = [row.table for row in rows]
        groups = [sorted(group) for group in length_groups(range(batch), lambda i: len(tables[i]) * bs)]
        dtype = pool.keys[0].dtype
        self.paged = PagedAttention(
            pool.keys,
            pool.values,
            [self._group(group, groups, tables, rows, own_index, bs, dtype, device) for group in groups],
        )
        slots, columns = write_slots.view(-1).to(device), max(len(t) for t in tables) * bs
        self.cache = Cache(
            layers=[
                PagedLayer(keys, values, slots, columns)
                for keys, values in zip(pool.keys, pool.values, strict=True)
            ]
        )

    @staticmethod
    def _group(
        members: list[int],
        groups: list[list[int]],
        tables: list[list[int]],
        rows: Sequence[RowKV],
        own_index: torch.Tensor,
        bs: int,
        dtype: torch.dtype,
        device: torch.device,
    ) -> AttentionGroup:
        """The attention group of batch rows ``members``: their gathered tables and mask."""
        width = max(len(tables[i]) for i in members)
        read_blocks = torch.tensor([tables[i] + [SCRATCH_BLOCK] * (width - len(tables[i])) for i in members])
        columns = torch.arange(width * bs)[None]  # [1, S]
        prefix_columns = torch.tensor([len(rows[i].prefix_blocks) * bs for i in members])[:, None]  # [b, 1]
        prefix_lengths = torch.tensor([rows[i].prefix_length for i in members])[:, None]
        own_column = (columns - prefix_columns)[:, None, :]  # [b, 1, S]
        index = own_index[members][:, :, None]  # [b, Q, 1]
        allowed = (columns < prefix_lengths)[:, None, :] | (
            (own_column >= 0) & (own_column <= index)
        )  # [b, Q, S]
        key_positions = torch.where(own_column >= 0, prefix_lengths[:, None] + own_column, columns[:, None])
        whole = len(groups) == 1
        return AttentionGroup(
            rows=None if whole else torch.tensor(members, device=device),
            size=len(members),
            read_blocks=read_blocks.view(-1).to(device),
            columns=width * bs,
            allowed=allowed[:, None].to(device),
            query_positions=(prefix_lengths[:, None] + index)[:, None].to(device),
            key_positions=key_positions[:, None].to(device),
            dtype=dtype,
        )

    def __len__(self) -> int:
        return len(self.rows)

    def model_kwargs(self, dtype: torch.dtype) -> dict[str, object]:
        """What the model's forward takes besides the inputs: a placeholder 4-D mask (a 4-D mask is passed
        through as it is: transformers builds none; ``paged_attention`` masks with ``paged``'s groups)."""
        batch, queries = self.input_ids.shape
        mask = torch.zeros(batch, 1, queries, 0, device=self.input_ids.device)
        return {"attention_mask": mask}

    def advance(self) -> None:
        """The forward pass wrote every row's inputs: count them as cached."""
        for row, fed in zip(self.rows, self.fed, strict=True):
            row.length += fed
