"""One forward pass over rows whose keys and values live in the KV pool.

A row's block table is its prefix's shared blocks followed by blocks of its own; its own tokens (prompt,
then generated ones) fill its own blocks in order. A forward pass feeds every row its next tokens: a
chunk of its prompt when prefilling, one token when decoding; decoding rows and prompt chunks share one
pass. The inputs are **packed**: one sequence ``[1, N]`` of every row's tokens in turn, with explicit
position ids, so the model's projections and MLPs compute the N real tokens and no padding, whatever the
rows' lengths. Each attention layer writes the new keys and values into their slots; ``paged_attention``
then reads them back group by group (decoding rows of similar table length together, prompt chunks of
similar length together), the group's queries laid out ``[b, H, Q, D]`` (each row's left-padded to the
group's longest), with a mask per group:

- a prefix slot is seen by every query of its row, a masked one (past the prefix, in its last block) by none;
- own slot ``k`` is seen by the row's query with own index ``t`` when ``k ≤ t``;
- a padding query sees what the row's first real query sees (never nothing: no NaN rows), and is dropped;
- in a local (sliding-window) layer, only slots less than the window behind the query in cache positions
  (the prefix at 0…P-1, own slot ``k`` at P + ``k``), as the model's own mask does under PEFT.

Attention ignores slot order (position ids are explicit and keys already rotated), so the gaps after a
prefix or at a table's end change no number that matters.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass, field
from typing import Any

import torch
from transformers.cache_utils import Cache, CacheLayerMixin

from prefix_store.lora import LoraAdapter
from prefix_store.prefix import Prefix
from server.engine.block_manager import BlockName, RowChain
from server.engine.kv_pool import SCRATCH_BLOCK, KVPool
from server.engine.lora_rows import LoraRows
from server.engine.paged_attention import AttentionGroup, PagedAttention
from server.engine.prefill_groups import length_groups, pass_groups
from server.engine.shared_head import SharedHead

# rows whose tables begin with this many tokens' blocks in common read them once (``shared_head``)
MIN_SHARED_HEAD_TOKENS = 64


@dataclass
class RowKV:
    """One row's place in the pool: its prefix's shared blocks, then blocks of its own."""

    prefix: Prefix | None
    prefix_blocks: list[int]
    blocks: list[int] = field(default_factory=list)
    length: int = 0  # own tokens written so far (prompt, then generated)
    # an encoder-decoder's row: its source's cross-attention keys and values, written at admission
    source_blocks: list[int] = field(default_factory=list)
    source_length: int = 0
    prefix_name: BlockName | None = None  # what names the prefix's blocks (None: no prefix)
    chain: RowChain | None = None  # how its own full blocks are named (prompt caching); None: they are not
    computing: list[BlockName] = field(default_factory=list)  # its prompt blocks other rows may wait for
    lora: LoraAdapter | None = None  # the row's LoRA task (its projections' updates), if it is on one

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
        self.rows, self.inputs, self.fed = list(rows), inputs, [len(tokens) for tokens in inputs]
        device, batch = pool.device, len(rows)
        packed = [token for tokens in inputs for token in tokens]
        self.input_ids = torch.tensor([packed], device=device)  # [1, N]
        fed = torch.tensor(self.fed)  # [B]
        first = fed.cumsum(0) - fed  # [B] each row's first packed index
        starts = torch.tensor([row.length for row in rows])  # [B] own tokens already cached
        prefix_lengths = torch.tensor([row.prefix_length for row in rows])  # [B]
        row_of = torch.repeat_interleave(torch.arange(batch), fed)  # [N]
        own_index = torch.arange(len(packed)) - first[row_of] + starts[row_of]  # [N] index among own tokens
        own_width = max(len(row.blocks) for row in rows)
        own_blocks = torch.tensor(
            [row.blocks + [SCRATCH_BLOCK] * (own_width - len(row.blocks)) for row in rows]
        )  # [B, W]
        write_slots = own_blocks[row_of, own_index // bs] * bs + own_index % bs  # [N]
        self.input_positions = (prefix_lengths[row_of] + own_index)[None].to(device)  # [1, N]
        self.last_inputs = (first + fed - 1).to(device)  # [B] the packed index each row's logits are read at
        self.lora = LoraRows.of([row.lora for row in rows], self.fed, device)  # None: no LoRA row

        tables = [row.table for row in rows]
        groups = pass_groups(tables, self.fed, bs, -(-MIN_SHARED_HEAD_TOKENS // bs))
        layout = _Layout(fed, first, starts, prefix_lengths, bs, pool.keys[0].dtype, device)
        sources = [row.source_blocks for row in rows]
        cross_groups = length_groups(range(batch), lambda i: len(sources[i])) if any(sources) else []
        self.paged = PagedAttention(
            pool.keys,
            pool.values,
            [
                layout.group(sorted(group), tables, rows, whole=len(groups) == 1, head_blocks=head)
                for group, head in groups
            ],
            [layout.cross_group(sorted(group), rows, whole=len(cross_groups) == 1) for group in cross_groups],
            positions=self.input_positions,
        )
        slots, columns = write_slots.to(device), max(len(t) for t in tables) * bs
        self.cache = Cache(
            layers=[
                PagedLayer(keys, values, slots, columns)
                for keys, values in zip(pool.keys, pool.values, strict=True)
            ]
        )

    def __len__(self) -> int:
        return len(self.rows)

    def model_kwargs(self, dtype: torch.dtype) -> dict[str, object]:
        """What the model's forward takes besides the inputs: a placeholder 4-D mask (a 4-D mask is passed
        through as it is: transformers builds none; ``paged_attention`` masks with ``paged``'s groups)."""
        mask = torch.zeros(1, 1, self.input_ids.shape[1], 0, device=self.input_ids.device)
        return {"attention_mask": mask}

    def advance(self) -> None:
        """The forward pass wrote every row's inputs: count them as cached."""
        for row, tokens in zip(self.rows, self.inputs, strict=True):
            row.length += len(tokens)
            if row.chain is not None:
                row.chain.tokens.extend(tokens)


@dataclass(frozen=True)
class _Layout:
    """Where each row's inputs sit in the packed pass, for building the attention groups of its rows."""

    fed: torch.Tensor  # [B] inputs per row
    first: torch.Tensor  # [B] each row's first packed index
    starts: torch.Tensor  # [B] own tokens already cached
    prefix_lengths: torch.Tensor  # [B]
    block_size: int
    dtype: torch.dtype
    device: torch.device

    def group(
        self,
        members: list[int],
        tables: list[list[int]],
        rows: Sequence[RowKV],
        *,
        whole: bool,
        head_blocks: int = 0,
    ) -> AttentionGroup:
        """The attention group of batch rows ``members`` (``whole``: every row of the pass) over their own
        caches: their queries, gathered tables and mask; with ``head_blocks``, the leading blocks of their
        tables, which they all share, are also laid out to be read once."""
        bs = self.block_size
        queries = self._queries(members, whole)
        index = queries.own_index[:, :, None]  # [b, Q, 1]
        width = max(len(tables[i]) for i in members)
        columns = torch.arange(width * bs)[None]  # [1, S]
        prefix_columns = torch.tensor([len(rows[i].prefix_blocks) * bs for i in members])[:, None]  # [b, 1]
        prefix_lengths = self.prefix_lengths[queries.members][:, None]  # [b, 1]
        own_column = (columns - prefix_columns)[:, None, :]  # [b, 1, S]
        allowed = (columns < prefix_lengths)[:, None, :] | (
            (own_column >= 0) & (own_column <= index)
        )  # [b, Q, S]
        key_positions = torch.where(own_column >= 0, prefix_lengths[:, None] + own_column, columns[:, None])
        return queries.attention_group(
            self._read_blocks([tables[i] for i in members]),
            width * bs,
            allowed=allowed[:, None].to(self.device),
            query_positions=(prefix_lengths[:, None] + index)[:, None].to(self.device),
            key_positions=key_positions[:, None].to(self.device),
            dtype=self.dtype,
            shared_head=self._shared_head(members, tables, allowed, head_blocks) if head_blocks else None,
        )

    def _shared_head(
        self, members: list[int], tables: list[list[int]], allowed: torch.Tensor, head_blocks: int
    ) -> SharedHead:
        """The head blocks rows ``members`` share and their tails; ``allowed`` ``[b, Q, S]``: the group's."""
        head_columns = head_blocks * self.block_size
        minimum = torch.finfo(self.dtype).min

        def additive(where: torch.Tensor) -> torch.Tensor:
            mask = torch.zeros(where.shape, dtype=self.dtype)
            return mask.masked_fill_(~where, minimum).to(self.device)

        return SharedHead(
            blocks=torch.tensor(tables[members[0]][:head_blocks], device=self.device),
            mask=additive(allowed[:, :, :head_columns].reshape(-1, head_columns)),
            tail_blocks=self._read_blocks([tables[i][head_blocks:] for i in members]),
            tail_columns=allowed.shape[2] - head_columns,
            tail_mask=additive(allowed[:, None, :, head_columns:]),
        )

    def cross_group(self, members: list[int], rows: Sequence[RowKV], *, whole: bool) -> AttentionGroup:
        """The cross-attention group of batch rows ``members``: every query of a row sees its source."""
        queries = self._queries(members, whole)
        width = max(len(rows[i].source_blocks) for i in members)
        columns = torch.arange(width * self.block_size)[None]  # [1, S]
        source_lengths = torch.tensor([rows[i].source_length for i in members])[:, None]  # [b, 1]
        allowed = (columns < source_lengths)[:, None, None, :].expand(
            -1, 1, queries.queries, -1
        )  # [b, 1, Q, S]
        no_positions = torch.zeros(1, 1, 1, 1, dtype=torch.long, device=self.device)  # no window, no bias
        return queries.attention_group(
            self._read_blocks([rows[i].source_blocks for i in members]),
            width * self.block_size,
            allowed=allowed.to(self.device),
            query_positions=no_positions,
            key_positions=no_positions,
            dtype=self.dtype,
        )

    def _read_blocks(self, tables: list[list[int]]) -> torch.Tensor:
        """``[b * T]``: the tables, each padded with the scratch block to the longest."""
        width = max(len(table) for table in tables)
        padded = [table + [SCRATCH_BLOCK] * (width - len(table)) for table in tables]
        return torch.tensor(padded).view(-1).to(self.device)

    def _queries(self, members: list[int], whole: bool) -> _GroupQueries:
        """Where the queries of batch rows ``members`` sit: each row's left-padded to the longest."""
        m = torch.tensor(members)
        fed = self.fed[m][:, None]  # [b, 1]
        queries = int(fed.max())
        pad = queries - fed  # [b, 1] left padding of each row's queries
        shift = (torch.arange(queries)[None] - pad).clamp(min=0)  # [b, Q]; a padding query is the first one
        token = (self.first[m][:, None] + shift).view(-1)  # [b * Q] the packed index each query reads
        real = (torch.arange(queries)[None] >= pad).view(-1)  # [b * Q]
        padded = not bool(real.all())
        in_order = whole and not padded  # the group's queries are the pass's inputs as they are
        return _GroupQueries(
            members=m,
            queries=queries,
            own_index=self.starts[m][:, None] + shift,
            query_tokens=None if in_order else token.to(self.device),
            output_tokens=None if in_order else (token[real] if padded else token).to(self.device),
            real_queries=real.nonzero().view(-1).to(self.device) if padded else None,
        )


@dataclass(frozen=True)
class _GroupQueries:
    """The queries of one attention group in the packed pass (``AttentionGroup`` says what each field is)."""

    members: torch.Tensor  # [b] the rows' indices in the batch
    queries: int  # Q
    own_index: torch.Tensor  # [b, Q] each query's index among its row's own tokens
    query_tokens: torch.Tensor | None
    output_tokens: torch.Tensor | None
    real_queries: torch.Tensor | None

    def attention_group(self, read_blocks: torch.Tensor, columns: int, **masks: Any) -> AttentionGroup:
        """The group of these queries over ``read_blocks`` (``columns`` slots per row), with ``masks``."""
        return AttentionGroup(
            size=len(self.members),
            queries=self.queries,
            query_tokens=self.query_tokens,
            output_tokens=self.output_tokens,
            real_queries=self.real_queries,
            read_blocks=read_blocks,
            columns=columns,
            **masks,
        )
