"""The running batch: rows that decode together, one token per row per step, in preallocated slots.

Each layer's keys and values live in buffers ``[R, kv_heads, C, head_dim]``; active rows are buffer
rows ``[0, n)``, and every row writes its next token at the shared column ``end``. A row's earlier
slots (its prefix, prompt and generated tokens, compacted when it joined) sit right before ``end``;
anything else in its buffer row is masked. Attention ignores slot order (position ids are explicit
and keys are already rotated), so:

- joining copies only the new rows' slots in, right-aligned at ``end``;
- leaving moves the last active row into the freed one (one row's copy), and the window's ``start``
  moves right past columns no remaining row uses;
- a step writes in place (``SlotCache``) and attends over a view; the buffers grow (or shift left)
  only when ``end`` reaches their capacity, so copies of the whole cache are rare;
- the buffers have as many rows as the batch has needed (doubling up to ``capacity``), and shrink
  (to half) once a quarter of their rows or columns is all the remaining rows use: one long request
  does not keep ``capacity`` rows of its length allocated, during its life or after it.
"""

from __future__ import annotations

from collections.abc import Sequence
from typing import Generic, TypeVar

import torch

from prefix_store.geometry import ModelGeometry
from server.engine.prefill_batch import PrefillBatch
from server.engine.slot_cache import SlotCache, SlotWindow

Row = TypeVar("Row")

_MIN_COLUMNS = 64
_MIN_ROWS = 1


class RunningBatch(Generic[Row]):
    """Decoding rows and their caches. ``rows[i]`` is the caller's object for buffer row ``i``."""

    def __init__(
        self, geometry: ModelGeometry, capacity: int, device: torch.device, dtype: torch.dtype
    ) -> None:
        self.geometry, self.capacity, self.device, self.dtype = geometry, capacity, device, dtype
        self.rows: list[Row] = []
        self.window = SlotWindow()
        self._allocate(_MIN_ROWS, _MIN_COLUMNS)
        self.next_tokens = torch.zeros(
            capacity, dtype=torch.long, device=device
        )  # [R]: each row's next input
        self.next_positions = torch.zeros(capacity, dtype=torch.long, device=device)  # [R]: its position id

    def _allocate(self, rows: int, columns: int) -> None:
        shape = (rows, self.geometry.num_kv_heads, columns, self.geometry.head_dim)
        layers = range(self.geometry.num_layers)
        self.keys = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in layers]  # [R, H, C, D]
        self.values = [torch.zeros(shape, device=self.device, dtype=self.dtype) for _ in layers]
        self.valid = torch.zeros(rows, columns, dtype=torch.bool, device=self.device)  # [R, C]
        self.cache = SlotCache(self.window, self.keys, self.values)

    def __len__(self) -> int:
        return len(self.rows)

    @property
    def columns(self) -> int:
        return self.valid.shape[1]

    @property
    def row_capacity(self) -> int:
        """Rows the buffers have now (at most ``capacity``)."""
        return self.valid.shape[0]

    # -- rows join and leave -----------------------------------------------------------------------
    def add(self, prefilled: PrefillBatch, rows: Sequence[Row], next_tokens: torch.Tensor) -> None:
        """Take over the rows of a prefilled batch (past its forward pass and ``advance``)."""
        if len(self.rows) + len(rows) > self.capacity:
            raise ValueError(f"the running batch holds at most {self.capacity} rows")
        lengths = prefilled.cache_mask.sum(dim=1).tolist()  # valid slots per new row
        if not self.rows:
            self.window.start = self.window.end = 0
        self._make_room(left=max(lengths), right=1, rows=len(self.rows) + len(rows))
        w = self.window
        for i, (row, length) in enumerate(zip(rows, lengths, strict=True)):
            slot = len(self.rows)
            columns = prefilled.cache_mask[i].nonzero().squeeze(1)  # this row's valid slots, in order
            self.valid[slot] = False
            self.valid[slot, w.end - length : w.end] = True
            for layer in range(self.geometry.num_layers):
                self.keys[layer][slot, :, w.end - length : w.end] = prefilled.layer_keys[layer][i, :, columns]
                self.values[layer][slot, :, w.end - length : w.end] = prefilled.layer_values[layer][
                    i, :, columns
                ]
            self.next_tokens[slot] = next_tokens[i]
            self.next_positions[slot] = prefilled.input_positions[i, -1]
            self.rows.append(row)
            w.rows = len(self.rows)
            w.start = min(w.start, w.end - length)

    def remove(self, indices: Sequence[int]) -> None:
        """Drop the rows at ``indices``: the last active row moves into each freed slot."""
        for index in sorted(set(indices), reverse=True):
            last = len(self.rows) - 1
            if index != last:
                self._move_row(last, index)
                self.rows[index] = self.rows[last]
            self.rows.pop()
            self.valid[last] = False
        self.window.rows = len(self.rows)
        used = self.valid[: len(self.rows), self.window.start : self.window.end].any(dim=0).nonzero()
        self.window.start = self.window.start + int(used[0]) if len(used) else self.window.end
        self._shrink()

    def _shrink(self) -> None:
        """Halve rows or columns the remaining rows use no more than a quarter of (memory goes back)."""
        n, width = len(self.rows), self.window.end - self.window.start
        rows = max(_MIN_ROWS, 2 * n) if 4 * n <= self.row_capacity else self.row_capacity
        columns = max(_MIN_COLUMNS, 2 * width) if 4 * width <= self.columns else self.columns
        if (rows, columns) != (self.row_capacity, self.columns):
            self._relayout(min(rows, self.row_capacity), min(columns, self.columns), offset=0)

    def _move_row(self, source: int, target: int) -> None:
        span = slice(self.window.start, self.window.end)
        self.valid[target] = False
        self.valid[target, span] = self.valid[source, span]
        for buffers in (self.keys, self.values):
            for buffer in buffers:
                buffer[target, :, span] = buffer[source, :, span]
        self.next_tokens[target] = self.next_tokens[source]
        self.next_positions[target] = self.next_positions[source]

    def _make_room(self, *, left: int, right: int, rows: int | None = None) -> None:
        """Ensure ``left`` columns before ``end``, ``right`` columns from ``end`` on, and buffer rows for
        ``rows`` rows (default: the active ones)."""
        w = self.window
        rows = len(self.rows) if rows is None else rows
        if w.end - left >= 0 and w.end + right <= self.columns and rows <= self.row_capacity:
            return
        used = w.end - w.start
        needed = max(used, left) + right
        columns = self.columns if needed <= self.columns // 2 else max(2 * self.columns, 2 * needed)
        if rows > self.row_capacity:
            row_capacity = min(self.capacity, max(2 * self.row_capacity, rows))
        else:
            row_capacity = self.row_capacity
        self._relayout(row_capacity, columns, offset=max(left - used, 0))  # where the kept window starts

    def _relayout(self, rows: int, columns: int, *, offset: int) -> None:
        """Move the active rows' window to column ``offset`` of buffers ``rows`` × ``columns`` (new ones
        when that is not their size)."""
        w = self.window
        used = w.end - w.start
        old_keys, old_values, old_valid = self.keys, self.values, self.valid
        if (rows, columns) != (self.row_capacity, self.columns):
            self._allocate(rows, columns)
        n = len(self.rows)
        span, target = slice(w.start, w.end), slice(offset, offset + used)
        self.valid[:n, target] = old_valid[:n, span].clone()
        self.valid[:n, :offset] = False
        self.valid[:n, offset + used :] = False
        for new, old in zip(self.keys + self.values, old_keys + old_values, strict=True):
            new[:n, :, target] = old[:n, :, span].clone()
        w.start, w.end = offset, offset + used

    # -- one decode step -----------------------------------------------------------------------
    def prepare_step(self) -> None:
        """Make sure the column for this step's tokens exists."""
        self._make_room(left=0, right=1)

    @property
    def input_ids(self) -> torch.Tensor:  # [n, 1]
        return self.next_tokens[: len(self.rows), None]

    @property
    def input_positions(self) -> torch.Tensor:  # [n, 1]
        return self.next_positions[: len(self.rows), None]

    def attention_mask(self, dtype: torch.dtype) -> torch.Tensor:
        """Additive mask ``[n, 1, 1, S + 1]`` over the window plus this step's own column."""
        w = self.window
        allowed = torch.cat(
            [
                self.valid[: w.rows, w.start : w.end],
                torch.ones(w.rows, 1, dtype=torch.bool, device=self.device),
            ],
            dim=1,
        )
        mask = torch.zeros(allowed.shape, dtype=dtype, device=self.device)
        mask.masked_fill_(~allowed, torch.finfo(dtype).min)
        return mask[:, None, None, :]

    def advance(self, next_tokens: torch.Tensor) -> None:
        """After the forward pass wrote this step's column: feed each row's sampled token ``[n]`` next."""
        n, w = len(self.rows), self.window
        self.valid[:n, w.end] = True
        w.end += 1
        self.next_tokens[:n] = next_tokens
        self.next_positions[:n] += 1
