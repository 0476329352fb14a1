"""A batch of rows, each with its own prefix (any length, or none), prompt length and positions.

Layout of one row's cache slots, everything left-padded so the newest token of every row sits in
the last column:

    [ pad | prefix (P_i) | pad | prompt (L_i) | generated ... ]

Padding slots hold zeros and are masked out. Every row carries explicit position ids: prompt token
``k`` of a row with a ``P``-token prefix has position ``P + k`` (PEFT's convention), so a row's
numbers never depend on its neighbours. The batch owns the cache, the attention mask and the
positions; ``filter`` and ``concatenate`` keep them consistent as rows leave and join.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass

import torch
from transformers import DynamicCache

from prefix_store import ModelGeometry, Prefix


@dataclass(frozen=True)
class BatchRow:
    """What the batch needs to know about one request when it joins."""

    request_id: str
    prompt_ids: Sequence[int]  # at least one token
    prefix: Prefix | None  # on the batch's device, in the model dtype; None = the base model alone


@dataclass
class PrefixBatch:
    """Rows that advance together, one forward pass per step."""

    request_ids: list[str]
    cache: DynamicCache  # per layer keys and values: [B, kv_heads, S, head_dim], S = cached slots
    cache_mask: torch.Tensor  # [B, S] bool: slot holds a real prefix vector or token
    input_ids: torch.Tensor  # [B, Q] long: tokens fed by the next forward
    input_mask: torch.Tensor  # [B, Q] bool: False for left padding of shorter prompts
    input_positions: torch.Tensor  # [B, Q] long: position id of each input token (0 for padding)

    @classmethod
    def from_rows(
        cls, rows: Sequence[BatchRow], geometry: ModelGeometry, device: torch.device, dtype: torch.dtype
    ) -> PrefixBatch:
        """Lay out new rows for their prefill: prefixes in the cache, prompts as the inputs."""
        if not rows:
            raise ValueError("a batch needs at least one row")
        if any(len(row.prompt_ids) == 0 for row in rows):
            raise ValueError("every row needs at least one prompt token")
        batch_size = len(rows)
        prefix_lengths = [row.prefix.num_virtual_tokens if row.prefix else 0 for row in rows]
        max_prefix = max(prefix_lengths)
        max_prompt = max(len(row.prompt_ids) for row in rows)
        shape = (batch_size, geometry.num_kv_heads, max_prefix, geometry.head_dim)
        layer_keys = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(geometry.num_layers)]
        layer_values = [torch.zeros(shape, device=device, dtype=dtype) for _ in range(geometry.num_layers)]
        cache_mask = torch.zeros(batch_size, max_prefix, dtype=torch.bool)
        input_ids = torch.zeros(batch_size, max_prompt, dtype=torch.long)
        input_mask = torch.zeros(batch_size, max_prompt, dtype=torch.bool)
        input_positions = torch.zeros(batch_size, max_prompt, dtype=torch.long)
        for i, (row, prefix_length) in enumerate(zip(rows, prefix_lengths, strict=True)):
            if row.prefix is not None and prefix_length:
                start = max_prefix - prefix_length
                for layer in range(geometry.num_layers):
                    layer_keys[layer][i, :, start:] = row.prefix.keys[layer]
                    layer_values[layer][i, :, start:] = row.prefix.values[layer]
                cache_mask[i, start:] = True
            prompt_length = len(row.prompt_ids)
            start = max_prompt - prompt_length
            input_ids[i, start:] = torch.tensor(list(row.prompt_ids), dtype=torch.long)
            input_mask[i, start:] = True
            input_positions[i, start:] = torch.arange(prefix_length, prefix_length + prompt_length)
        return cls(
            request_ids=[row.request_id for row in rows],
            cache=_cache_of(layer_keys, layer_values),
            cache_mask=cache_mask.to(device),
            input_ids=input_ids.to(device),
            input_mask=input_mask.to(device),
            input_positions=input_positions.to(device),
        )

    def __len__(self) -> int:
        return len(self.request_ids)

    @property
    def cache_length(self) -> int:
        """S: cached slots per row, padding included."""
        return int(self.cache_mask.shape[1])

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``[B, 1, Q, S + Q]`` for the next forward: 0 where allowed, dtype-min elsewhere.

        A query sees valid cache slots and valid inputs up to itself. Every query also sees itself, so
        no row of the mask is fully masked: padding queries then produce finite (unused) outputs
        instead of NaN on kernels that return NaN for empty rows, and a NaN never reaches a cache slot.
        """
        queries = self.input_ids.shape[1]
        device = self.input_ids.device
        key_valid = torch.cat([self.cache_mask, self.input_mask], dim=1)  # [B, S + Q]
        causal = torch.ones(queries, queries, dtype=torch.bool, device=device).tril()  # [Q, Q]
        past = torch.ones(queries, self.cache_length, dtype=torch.bool, device=device)  # [Q, S]
        allowed = torch.cat([past, causal], dim=1)[None] & key_valid[:, None, :]  # [B, Q, S + Q]
        diagonal = torch.eye(queries, dtype=torch.bool, device=device)
        allowed[:, :, self.cache_length :] |= diagonal
        mask = torch.zeros(allowed.shape, dtype=dtype, device=device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None]

    @property
    def layer_keys(self) -> list[torch.Tensor]:
        return [layer.keys for layer in self.cache.layers]

    @property
    def layer_values(self) -> list[torch.Tensor]:
        return [layer.values for layer in self.cache.layers]

    def advance(self, next_tokens: torch.Tensor) -> None:
        """After a forward pass (which grew ``cache`` by the inputs): feed each row's new token ``[B]`` next."""
        self.cache_mask = torch.cat([self.cache_mask, self.input_mask], dim=1)
        next_positions = self.input_positions[:, -1:] + 1  # the last input is always a real token
        self.input_ids = next_tokens.view(-1, 1).to(self.input_ids.device)
        self.input_mask = torch.ones_like(self.input_ids, dtype=torch.bool)
        self.input_positions = next_positions

    def filter(self, keep: Sequence[int]) -> PrefixBatch:
        """A batch of the rows at indices ``keep``, compacted: each row's valid cache slots move to the
        right end (attention ignores slot order: positions are explicit and keys already rotated), so
        the padding between a prefix and a shorter prompt, and the width of rows that left, go away."""
        index = torch.tensor(list(keep), dtype=torch.long, device=self.cache_mask.device)
        cache_mask = self.cache_mask[index]  # [B', S]
        width = int(cache_mask.sum(dim=1).max())
        order = torch.sort(cache_mask.to(torch.int8), dim=1, stable=True).indices  # padding slots first
        order = order[:, self.cache_length - width :]  # [B', width]

        def compact(tensor: torch.Tensor) -> torch.Tensor:  # [B, H, S, D] -> [B', H, width, D]
            rows = tensor[index]
            return rows.gather(2, order[:, None, :, None].expand(-1, rows.shape[1], -1, rows.shape[3]))

        return PrefixBatch(
            request_ids=[self.request_ids[i] for i in keep],
            cache=_cache_of([compact(k) for k in self.layer_keys], [compact(v) for v in self.layer_values]),
            cache_mask=cache_mask.gather(1, order),
            input_ids=self.input_ids[index],
            input_mask=self.input_mask[index],
            input_positions=self.input_positions[index],
        )

    @classmethod
    def concatenate(cls, batches: Sequence[PrefixBatch]) -> PrefixBatch:
        """Merge batches that are all decoding (one input token per row) into one.

        Shorter caches are left-padded with masked zero slots to the longest.
        """
        if any(batch.input_ids.shape[1] != 1 for batch in batches):
            raise ValueError("only batches past their prefill (one input token per row) can be merged")
        length = max(batch.cache_length for batch in batches)

        def left_pad(tensor: torch.Tensor, dim: int, pad: int) -> torch.Tensor:
            if pad == 0:
                return tensor
            shape = list(tensor.shape)
            shape[dim] = pad
            return torch.cat([tensor.new_zeros(shape), tensor], dim=dim)

        num_layers = len(batches[0].layer_keys)
        pads = [length - batch.cache_length for batch in batches]
        return cls(
            request_ids=[rid for batch in batches for rid in batch.request_ids],
            cache=_cache_of(
                [
                    torch.cat(
                        [left_pad(b.layer_keys[layer], 2, p) for b, p in zip(batches, pads, strict=True)]
                    )
                    for layer in range(num_layers)
                ],
                [
                    torch.cat(
                        [left_pad(b.layer_values[layer], 2, p) for b, p in zip(batches, pads, strict=True)]
                    )
                    for layer in range(num_layers)
                ],
            ),
            cache_mask=torch.cat([left_pad(b.cache_mask, 1, p) for b, p in zip(batches, pads, strict=True)]),
            input_ids=torch.cat([b.input_ids for b in batches]),
            input_mask=torch.cat([b.input_mask for b in batches]),
            input_positions=torch.cat([b.input_positions for b in batches]),
        )


def _cache_of(layer_keys: list[torch.Tensor], layer_values: list[torch.Tensor]) -> DynamicCache:
    """A transformers cache holding these per-layer tensors ``[B, kv_heads, S, head_dim]``."""
    return DynamicCache(ddp_cache_data=list(zip(layer_keys, layer_values, strict=True)))
