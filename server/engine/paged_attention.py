"""Attention over the KV pool, plugged into transformers' attention interface.

A model served by the engine runs with the attention implementation ``ATTENTION``: every attention layer
of the unmodified model calls ``paged_attention`` with its queries. In an engine forward pass (one that
carries ``paged=`` a ``PagedAttention``) the function reads the keys and values from the pool itself:
the batch's rows are split into groups of similar context length, and each group's block tables are
gathered and attended with SDPA (``_attend``). So a decode step that holds one 2,000-token
row among short ones does not make every short row attend over 2,000 padded columns, while the model's
projections and MLPs still run once over the whole batch. Any other call (training, a reference loop)
is plain SDPA, with SDPA's own mask construction.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

ATTENTION = "prefix_serve_paged"


@dataclass(frozen=True)
class AttentionGroup:
    """Rows of one forward pass that attend together, over ``columns`` gathered slots each."""

    rows: torch.Tensor | None  # [b] the rows' indices in the batch; None: every row, in order
    size: int  # b
    read_blocks: torch.Tensor  # [b * T] the rows' block tables, T blocks each (padded with the scratch block)
    columns: int  # S = T * block_size
    mask: torch.Tensor  # [b, 1, Q, S] additive: 0 where a query may look, dtype-min elsewhere


@dataclass(frozen=True)
class PagedAttention:
    """What every attention layer of one engine forward pass reads: the pool and the groups."""

    pool_keys: Sequence[torch.Tensor]  # per layer [N, block_size, kv_heads, head_dim]
    pool_values: Sequence[torch.Tensor]
    groups: Sequence[AttentionGroup]

    def attend(self, module: torch.nn.Module, query: torch.Tensor, **kwargs: object) -> torch.Tensor:
        """``query`` ``[B, heads, Q, D]`` → the attention output ``[B, Q, heads, D]``."""
        layer = module.layer_idx
        keys, values = self.pool_keys[layer], self.pool_values[layer]
        heads, dim = keys.shape[2], keys.shape[3]
        output = None
        for group in self.groups:
            shape = (group.size, group.columns, heads, dim)
            k = keys.index_select(0, group.read_blocks).view(shape).transpose(1, 2)  # [b, H, S, D]
            v = values.index_select(0, group.read_blocks).view(shape).transpose(1, 2)
            q = query if group.rows is None else query.index_select(0, group.rows)
            attended = _attend(module, q, k, v, group.mask, **kwargs)
            if group.rows is None:
                return attended
            if output is None:
                output = attended.new_empty(query.shape[0], *attended.shape[1:])
            output.index_copy_(0, group.rows, attended)
        return output


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    **kwargs: object,
) -> torch.Tensor:
    """SDPA of ``query`` ``[b, heads, Q, D]`` over ``key``/``value`` ``[b, kv_heads, S, D]`` → ``[b, Q, heads, D]``.
    On the CPU, SDPA's own grouped-query mode with the mask (about a third faster at one query per row than
    transformers' packing of the query heads, which it does because CUDA's kernels refuse a mask with
    grouped heads); elsewhere, or for what plain SDPA cannot do (soft-capping, a position bias), transformers'
    function."""
    if (
        query.device.type != "cpu"
        or kwargs.get("softcap") is not None
        or kwargs.get("position_bias") is not None
    ):
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)[0]
    grouped = query.shape[1] != key.shape[1]
    scale = kwargs.get("scaling")
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=grouped
    )
    return attended.transpose(1, 2)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    *,
    paged: PagedAttention | None = None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: the pool's when ``paged`` is given, else plain SDPA."""
    if paged is None:
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for unused in ("dropout", "is_causal"):
        kwargs.pop(unused, None)
    return paged.attend(module, query, **kwargs), None


AttentionInterface.register(ATTENTION, paged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # outside the engine, masks are SDPA's


def use_paged_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to ``ATTENTION``; raises ``ValueError`` if its attention layers cannot be switched
    (a model that does not go through transformers' attention interface)."""
    model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION:
        raise ValueError(
            f"{type(model).__name__} does not route its attention through transformers' attention interface, "
            "so the engine cannot read its keys and values from the KV pool"
        )
