"""A transformers ``Cache`` over preallocated buffers: a decode step writes its new keys and values in
place and the model attends over a view, so no step copies the cache (a ``DynamicCache`` concatenates,
copying every layer's whole cache on every step)."""

from __future__ import annotations

from dataclasses import dataclass

import torch
from transformers.cache_utils import Cache, CacheLayerMixin


@dataclass
class SlotWindow:
    """Which part of the buffers the next forward pass sees; shared by every layer of one cache."""

    rows: int = 0  # active rows: buffer rows [0, rows)
    start: int = 0  # first column any active row uses
    end: int = 0  # the next token of every row is written at this column


class SlotLayer(CacheLayerMixin):
    """One attention layer's keys and values, ``[R, kv_heads, C, head_dim]`` buffers (R rows, C columns)."""

    is_compileable = False
    is_sliding = False

    def __init__(self, window: SlotWindow, keys: torch.Tensor, values: torch.Tensor) -> None:
        super().__init__()
        self.window = window
        self.keys, self.values = keys, values
        self.is_initialized = True
        self.device = keys.device

    def lazy_initialization(self, key_states: torch.Tensor, value_states: torch.Tensor) -> None:
        raise AssertionError("slot layers are allocated up front")

    def update(
        self, key_states: torch.Tensor, value_states: torch.Tensor, *args, **kwargs
    ) -> tuple[torch.Tensor, torch.Tensor]:
        """Write ``[rows, H, q, D]`` new states at the window's end; return the window, new states included."""
        w = self.window
        queries = key_states.shape[2]
        self.keys[: w.rows, :, w.end : w.end + queries] = key_states
        self.values[: w.rows, :, w.end : w.end + queries] = value_states
        return self.keys[: w.rows, :, w.start : w.end + queries], self.values[
            : w.rows, :, w.start : w.end + queries
        ]

    def get_mask_sizes(self, query_length: int) -> tuple[int, int]:
        return self.get_seq_length() + query_length, 0

    def get_seq_length(self) -> int:
        return self.window.end - self.window.start

    def get_max_length(self) -> int:
        return -1


class SlotCache(Cache):
    """The cache of a ``RunningBatch``: one ``SlotLayer`` per attention layer over the batch's buffers."""

    def __init__(self, window: SlotWindow, keys: list[torch.Tensor], values: list[torch.Tensor]) -> None:
        super().__init__(layers=[SlotLayer(window, k, v) for k, v in zip(keys, values, strict=True)])
