"""Attention over the KV pool, plugged into transformers' attention interface.

A model served by the engine runs with the attention implementation ``ATTENTION``: every attention layer
of the unmodified model calls ``paged_attention`` with its queries. In an engine forward pass (one run
inside ``reading_pool``) the function reads the keys and values from the pool itself: the batch's rows
are split into groups of similar context length, and each group's block tables are gathered and attended
(``_attend``). So a decode step that holds one 2,000-token row among short ones does not make every
short row attend over 2,000 padded columns, while the model's projections and MLPs still run once over
the whole batch. Any other call (training, a reference loop) is the model's own attention as
transformers would run it: SDPA with SDPA's own masks (soft-capped scores: the model's eager function).
"""

from __future__ import annotations

import contextlib
import sys
import weakref
from collections.abc import Callable, Iterator, Sequence
from contextvars import ContextVar
from dataclasses import dataclass, field

import torch
import torch.nn.functional as F
from transformers import AttentionInterface, PreTrainedModel
from transformers.integrations.sdpa_attention import sdpa_attention_forward
from transformers.masking_utils import AttentionMaskInterface, sdpa_mask

from server.engine.model_support import UnsupportedModel
from server.engine.shared_head import SharedHead, attend_shared_head

ATTENTION = "prefix_serve_paged"


@dataclass(frozen=True)
class AttentionRole:
    """What an encoder-decoder's decoder attention layer reads in an engine pass (``set_role``)."""

    cross: bool  # the row's source blocks (else its own cache: prefix, then decoder tokens)
    # T5: cache positions key - query ``[b, 1, Q, S]`` → its additive bias ``[b, heads, Q, S]``
    relative_bias: Callable[[torch.Tensor], torch.Tensor] | None = None


_ROLES: weakref.WeakKeyDictionary[torch.nn.Module, AttentionRole] = weakref.WeakKeyDictionary()


def set_role(module: torch.nn.Module, role: AttentionRole) -> None:
    """Mark an attention layer of an encoder-decoder's decoder (a layer with no role reads its own cache)."""
    _ROLES[module] = role


@dataclass
class AttentionGroup:
    """Rows of one packed forward pass that attend together, ``queries`` each (left-padded), over
    ``columns`` gathered slots each."""

    size: int  # b
    queries: int  # Q: the group's longest row's inputs
    # [b * Q] the packed index each of the group's queries reads (a padding one: its row's first input);
    # None: the pass's inputs in order (one group, no padding)
    query_tokens: torch.Tensor | None
    output_tokens: torch.Tensor | None  # [n] the packed index each real query writes (None: as read)
    real_queries: torch.Tensor | None  # [n] which of the b * Q queries are real (None: all)
    read_blocks: torch.Tensor  # [b * T] the rows' block tables, T blocks each (padded with the scratch block)
    columns: int  # S = T * block_size
    allowed: torch.Tensor  # [b, 1, Q, S] bool: where a query may look
    query_positions: torch.Tensor  # [b, 1, Q, 1] each query's cache position (the prefix holds 0…P-1)
    key_positions: torch.Tensor  # [b, 1, 1, S] each slot's cache position
    dtype: torch.dtype  # the masks'
    shared_head: SharedHead | None = None  # the leading blocks every row's table begins with, if read once
    _masks: dict[int | None, torch.Tensor] = field(default_factory=dict)
    _biased: torch.Tensor | None = None  # the ALiBi or relative-bias mask, once built (one model has one)

    def mask(self, sliding_window: int | None = None) -> torch.Tensor:
        """``[b, 1, Q, S]`` additive: 0 where a query may look, dtype-min elsewhere. With a sliding window
        (a local attention layer), only at keys less than ``sliding_window`` cache positions behind the
        query, transformers' rule, so a prefix leaves a local layer's window as PEFT's does. Built once
        per pass and window."""
        if sliding_window not in self._masks:
            allowed = self.allowed
            if sliding_window is not None:
                allowed = allowed & (self.query_positions - self.key_positions < sliding_window)
            mask = torch.zeros(allowed.shape, dtype=self.dtype, device=allowed.device)
            self._masks[sliding_window] = mask.masked_fill_(~allowed, torch.finfo(self.dtype).min)
        return self._masks[sliding_window]

    def bias_mask(self, relative_bias: Callable[[torch.Tensor], torch.Tensor]) -> torch.Tensor:
        """``[b, heads, Q, S]``: ``mask()`` plus a relative position bias of key - query cache positions
        (T5's, the prefix at 0…P-1); one bias for every layer, so it is built once per pass."""
        if self._biased is None:
            self._biased = self.mask() + relative_bias(self.key_positions - self.query_positions).to(
                self.dtype
            )
        return self._biased

    def alibi_mask(self, slopes: torch.Tensor) -> torch.Tensor:
        """``[b, heads, Q, S]``: ``mask()`` plus ALiBi's ``slopes[h] × key position`` (BLOOM's bias up to a
        constant per query; masked slots stay far below any real score). ``slopes``: the model's, one
        tensor for every layer, so it is built once per pass."""
        if self._biased is None:
            bias = slopes.view(1, -1, 1, 1) * self.key_positions
            self._biased = self.mask() + bias.to(self.dtype)
        return self._biased


@dataclass(frozen=True)
class PagedAttention:
    """What every attention layer of one engine forward pass reads: the pool and the groups."""

    pool_keys: Sequence[torch.Tensor]  # per layer [N, block_size, kv_heads, head_dim]
    pool_values: Sequence[torch.Tensor]
    groups: Sequence[AttentionGroup]
    cross_groups: Sequence[AttentionGroup] = ()  # an encoder-decoder's: over the rows' source blocks
    positions: torch.Tensor | None = None  # [1, N] the inputs' position ids (for position embeddings)

    def attend(
        self,
        module: torch.nn.Module,
        query: torch.Tensor,
        sliding_window: int | None = None,
        alibi_slopes: torch.Tensor | None = None,
        **kwargs: object,
    ) -> torch.Tensor:
        """``query`` ``[1, heads, N, D]`` (the packed pass's) → the attention output ``[1, N, heads, D]``;
        ``sliding_window``: the layer's, if it is a local one; ``alibi_slopes`` ``[heads]``: the model's,
        if it biases by ALiBi."""
        layer = module.layer_idx
        keys, values = self.pool_keys[layer], self.pool_values[layer]
        kv_heads, dim = keys.shape[2], keys.shape[3]
        packed = query[0]  # [H, N, D]
        heads, tokens = packed.shape[0], packed.shape[1]
        role = _ROLES.get(module)
        kwargs.pop("position_bias", None)  # a dense batch's: the groups know each row's positions
        output = None
        for group in self.cross_groups if role is not None and role.cross else self.groups:
            read = packed if group.query_tokens is None else packed.index_select(1, group.query_tokens)
            q = read.reshape(heads, group.size, group.queries, dim).transpose(0, 1)  # [b, H, Q, D]
            plain = alibi_slopes is None and sliding_window is None and kwargs.get("softcap") is None
            if group.shared_head is not None and plain and (role is None or role.relative_bias is None):
                attended = attend_shared_head(q, keys, values, group.shared_head, kwargs.get("scaling"))
            else:
                shape = (group.size, group.columns, kv_heads, dim)
                k = keys.index_select(0, group.read_blocks).view(shape).transpose(1, 2)  # [b, H_kv, S, D]
                v = values.index_select(0, group.read_blocks).view(shape).transpose(1, 2)
                if alibi_slopes is not None:
                    mask = group.alibi_mask(alibi_slopes)
                elif role is not None and role.relative_bias is not None:
                    mask = group.bias_mask(role.relative_bias)
                else:
                    mask = group.mask(sliding_window)
                attended = _attend(module, q, k, v, mask, **kwargs)
            attended = attended.reshape(-1, heads, dim)  # [b * Q, H, D]
            if group.query_tokens is None:
                return attended.view(1, tokens, heads, dim)
            if group.real_queries is not None:
                attended = attended.index_select(0, group.real_queries)
            if output is None:
                output = attended.new_empty(tokens, heads, dim)
            output.index_copy_(0, group.output_tokens, attended)
        return output.view(1, tokens, heads, dim)


def _attend(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    mask: torch.Tensor,
    **kwargs: object,
) -> torch.Tensor:
    """Attention of ``query`` ``[b, heads, Q, D]`` over ``key``/``value`` ``[b, kv_heads, S, D]`` →
    ``[b, Q, heads, D]``. Soft-capped scores (Gemma 2), which SDPA cannot compute, go through the model's own
    eager attention function. Otherwise SDPA: on the CPU in its own grouped-query mode with the mask (about
    a third faster at one query per row than transformers' packing of the query heads, which it does
    because CUDA's kernels refuse a mask with grouped heads), elsewhere through transformers' function."""
    if kwargs.get("softcap") is not None:
        return _eager(module)(module, query, key, value, mask, **kwargs)[0]
    if query.device.type != "cpu":
        return sdpa_attention_forward(module, query, key, value, mask, is_causal=False, **kwargs)[0]
    grouped = query.shape[1] != key.shape[1]
    scale = kwargs.get("scaling")
    attended = F.scaled_dot_product_attention(
        query, key, value, attn_mask=mask, scale=scale, enable_gqa=grouped
    )
    return attended.transpose(1, 2)


def _eager(module: torch.nn.Module) -> Callable[..., tuple[torch.Tensor, torch.Tensor | None]]:
    """The eager attention function of ``module``'s model (its own module's ``eager_attention_forward``)."""
    eager = getattr(sys.modules[type(module).__module__], "eager_attention_forward", None)
    if eager is None:
        raise UnsupportedModel(f"{type(module).__name__} soft-caps its scores but has no eager attention")
    return eager


# the forward pass being run over the pool, if any: set by ``reading_pool`` around it (a context variable,
# not a model argument: some models do not hand their layers the forward's extra arguments)
_CURRENT: ContextVar[PagedAttention | None] = ContextVar("paged_attention", default=None)


def in_engine_pass() -> bool:
    """Whether attention now reads the KV pool (a forward pass run inside ``reading_pool``)."""
    return _CURRENT.get() is not None


def current_pass() -> PagedAttention | None:
    """The engine forward pass being run over the pool, if any."""
    return _CURRENT.get()


@contextlib.contextmanager
def reading_pool(paged: PagedAttention | None) -> Iterator[None]:
    """Within it, attention layers read ``paged``'s pool (None: plain SDPA)."""
    token = _CURRENT.set(paged)
    try:
        yield
    finally:
        _CURRENT.reset(token)


def paged_attention(
    module: torch.nn.Module,
    query: torch.Tensor,
    key: torch.Tensor,
    value: torch.Tensor,
    attention_mask: torch.Tensor | None,
    **kwargs: object,
) -> tuple[torch.Tensor, None]:
    """The registered attention function: the pool's inside ``reading_pool``, else plain SDPA."""
    paged = _CURRENT.get()
    if paged is None:
        if kwargs.get("softcap") is not None:
            return _eager(module)(module, query, key, value, attention_mask, **kwargs)
        return sdpa_attention_forward(module, query, key, value, attention_mask, **kwargs)
    for unused in ("dropout", "is_causal"):
        kwargs.pop(unused, None)
    return paged.attend(module, query, **kwargs), None


AttentionInterface.register(ATTENTION, paged_attention)
AttentionMaskInterface.register(ATTENTION, sdpa_mask)  # outside the engine, masks are SDPA's


def use_paged_attention(model: PreTrainedModel) -> None:
    """Switch ``model`` to ``ATTENTION``; raises ``UnsupportedModel`` if its attention layers cannot be
    switched (a model that computes attention itself, not through transformers' attention interface, unless
    it is one whose attention code ``family_attention`` reroutes: BLOOM, Falcon)."""
    from server.engine.family_attention import check_family_variant, route_own_attention  # it imports this

    check_family_variant(model.config.get_text_config())
    with contextlib.suppress(ValueError):  # said below, in the engine's words
        model.set_attn_implementation(ATTENTION)
    if model.config._attn_implementation != ATTENTION and not route_own_attention(model):
        raise UnsupportedModel(
            f"{type(model).__name__} does not route its attention through transformers' attention interface, "
            "so the engine cannot read its keys and values from the KV pool"
        )
