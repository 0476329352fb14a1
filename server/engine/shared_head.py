"""Attention of rows that share the leading blocks of their block tables (a task's prefix, a cached
system prompt, or both): the shared head is read once for all of them, not once per row.

Gathering every row's whole table copies the head once per row and layer: 16 rows over a 1,600-token
head on an 8-layer model move about 0.9 GB per decode step. Here the rows' queries meet the head's keys
in one product (the rows' queries stacked as the queries of one sequence), each row's own tail is
gathered and attended as before, and one softmax runs over the head's and the tail's scores side by side
(the same numbers as one softmax over the whole table; FlashInfer's cascade attention merges two partial
softmaxes by their log-sum-exp instead, which is what a fused kernel needs). Pure attention arithmetic:
layers with a sliding window, ALiBi, a relative position bias or soft-capped scores read whole tables.
"""

from __future__ import annotations

from dataclasses import dataclass

import torch


@dataclass(frozen=True)
class SharedHead:
    """The head blocks a group's rows share and the rest of their tables."""

    blocks: torch.Tensor  # [Hb] the head's block ids, the same for every row
    mask: torch.Tensor  # [b * Q, Hc] additive: where each query may look in the head (Hc = Hb * block_size)
    tail_blocks: torch.Tensor  # [b * T] each row's table after the head, padded with the scratch block
    tail_columns: int  # Tc = T * block_size
    tail_mask: torch.Tensor  # [b, 1, Q, Tc] additive


def attend_shared_head(
    query: torch.Tensor,
    pool_keys: torch.Tensor,
    pool_values: torch.Tensor,
    head: SharedHead,
    scale: float | None,
) -> torch.Tensor:
    """``query`` ``[b, heads, Q, D]`` over the head and each row's tail of one layer's pool
    (``[N, block_size, kv_heads, D]``) → ``[b, Q, heads, D]``."""
    rows, heads, queries, dim = query.shape
    kv_heads = pool_keys.shape[2]
    share = heads // kv_heads  # query heads per key head (transformers' repeat_kv order)
    scale = dim**-0.5 if scale is None else scale
    head_columns = head.mask.shape[1]

    def gather(pool: torch.Tensor, blocks: torch.Tensor, batch: int) -> torch.Tensor:
        return (
            pool.index_select(0, blocks).view(batch, -1, kv_heads, dim).transpose(1, 2)
        )  # [batch, H_kv, S, D]

    head_keys, head_values = gather(pool_keys, head.blocks, 1)[0], gather(pool_values, head.blocks, 1)[0]
    tail_keys, tail_values = (
        gather(pool_keys, head.tail_blocks, rows),
        gather(pool_values, head.tail_blocks, rows),
    )

    # every row's queries against the head in one product: [H_kv, share * b * Q, D] @ [H_kv, D, Hc]
    stacked = query.transpose(0, 1).reshape(kv_heads, share * rows * queries, dim)
    head_scores = (stacked @ head_keys.transpose(1, 2)).float().view(heads, rows * queries, head_columns)
    head_scores = head_scores * scale + head.mask  # [H, b * Q, Hc]
    # each row's queries against its own tail: [b, H_kv, share * Q, D] @ [b, H_kv, D, Tc]
    own = query.reshape(rows, kv_heads, share * queries, dim)
    tail_scores = (own @ tail_keys.transpose(2, 3)).float().view(rows, heads, queries, head.tail_columns)
    tail_scores = tail_scores * scale + head.tail_mask  # [b, H, Q, Tc]
    tail_scores = tail_scores.transpose(0, 1).reshape(heads, rows * queries, head.tail_columns)

    weights = torch.cat([head_scores, tail_scores], dim=-1).softmax(dim=-1).to(query.dtype)  # [H, b * Q, S]
    head_weights, tail_weights = weights.split([head_columns, head.tail_columns], dim=-1)
    from_head = head_weights.reshape(kv_heads, share * rows * queries, head_columns) @ head_values
    from_head = from_head.view(heads, rows, queries, dim).transpose(0, 1)  # [b, H, Q, D]
    tail_weights = tail_weights.view(heads, rows, queries, -1).transpose(0, 1)  # [b, H, Q, Tc]
    from_tail = tail_weights.reshape(rows, kv_heads, share * queries, -1) @ tail_values
    return (from_head + from_tail.view(rows, heads, queries, dim)).transpose(1, 2)
