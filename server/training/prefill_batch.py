"""The dense layout: rows, each with its own prefix (any length, or none), prompt and positions, in a plain
transformers cache. Training (gradients flow into the prefix) and reference loops use it; the engine
serves from the paged KV cache (``server.engine.paged_batch``), which computes the same numbers.

Layout of one row's cache slots, left-padded so every row's last prompt token sits in the last
column:

    [ pad | prefix (P_i) | pad | prompt (L_i) ]

Padding slots hold zeros and are masked out. Every row carries explicit position ids: prompt token
``k`` of a row with a ``P``-token prefix has position ``P + k`` (PEFT's convention), so a row's
numbers never depend on its neighbours.
"""

from __future__ import annotations

from collections.abc import Sequence
from dataclasses import dataclass
from typing import ClassVar

import torch
from transformers.cache_utils import Cache, DynamicLayer

from prefix_store.geometry import ModelGeometry
from prefix_store.prefix import Prefix


@dataclass(frozen=True)
class BatchRow:
    """What the batch needs to know about one request when it joins."""

    request_id: str
    prompt_ids: Sequence[int]  # at least one token
    prefix: Prefix | None  # on the batch's device, in the model dtype; None = the base model alone


@dataclass
class PrefillBatch:
    """Rows that advance together, one forward pass per step."""

    request_ids: list[str]
    cache: Cache  # per layer keys and values: [B, kv_heads, S, head_dim], S = cached slots
    cache_mask: torch.Tensor  # [B, S] bool: slot holds a real prefix vector or token
    input_ids: torch.Tensor  # [B, Q] long: tokens fed by the next forward
    input_mask: torch.Tensor  # [B, Q] bool: False for left padding of shorter prompts
    input_positions: torch.Tensor  # [B, Q] long: position id of each input token (0 for padding)
    paged: ClassVar[None] = None  # nothing in a KV pool: the cache holds every key and value
    lora: ClassVar[None] = None  # no LoRA rows
    last_inputs: ClassVar[int] = 1  # each row's last column holds its last real input

    @classmethod
    def from_rows(
        cls, rows: Sequence[BatchRow], geometry: ModelGeometry, device: torch.device, dtype: torch.dtype
    ) -> PrefillBatch:
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

    def model_kwargs(self, dtype: torch.dtype) -> dict[str, object]:
        """What the model's forward takes besides the inputs and the cache: the mask."""
        return {"attention_mask": self.attention_mask(dtype)}

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


def _cache_of(layer_keys: list[torch.Tensor], layer_values: list[torch.Tensor]) -> Cache:
    """A transformers cache holding these per-layer tensors ``[B, kv_heads, S, head_dim]`` (not copied)."""
    layers = []
    for keys, values in zip(layer_keys, layer_values, strict=True):
        layer = DynamicLayer()
        layer.lazy_initialization(keys, values)
        layer.keys, layer.values = keys, values
        layers.append(layer)
    return Cache(layers=layers)
