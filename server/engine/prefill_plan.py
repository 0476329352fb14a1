"""Chunked prefill: which prompts advance in a step, and by how much. Pure Python, no torch.

A prompt is prefilled in chunks of ``chunk_tokens`` (the last one shorter), one chunk per step, so a long
prompt never holds the running rows for its whole prefill: between two of their tokens a step spends at
most ``step_tokens`` prompt tokens (one chunk more if a single chunk exceeds it). Chunk boundaries depend on
the prompt alone, never on its neighbours, so a row computes the same numbers however it is batched.

The policy: **the oldest prefilling row always advances** (nothing starves: every row becomes the oldest in
turn), then the others **shortest remaining prompt first** while the step's budget lasts, so short requests
overtake a long one instead of queueing behind all its chunks (a short prompt's latency is then about its own
prefill, and a long one's grows by the few short chunks that pass it).
"""

from __future__ import annotations

from collections.abc import Callable, Sequence
from dataclasses import dataclass
from typing import Generic, TypeVar

Row = TypeVar("Row")


@dataclass(frozen=True)
class Chunk(Generic[Row]):
    row: Row
    tokens: int  # prompt tokens this step feeds
    last: bool  # the prompt's last chunk: its forward pass gives the row's first new token


def plan_chunks(
    rows: Sequence[Row], remaining: Callable[[Row], int], *, chunk_tokens: int, step_tokens: int
) -> list[Chunk[Row]]:
    """The chunks of this step; ``rows`` are the prefilling rows, oldest first, each with prompt left."""
    if not rows:
        return []

    def chunk(row: Row) -> Chunk[Row]:
        left = remaining(row)
        return Chunk(row, min(chunk_tokens, left), last=left <= chunk_tokens)

    oldest, *others = rows
    planned = [chunk(oldest)]
    spent = planned[0].tokens
    for row in sorted(others, key=remaining):
        candidate = chunk(row)
        if spent + candidate.tokens > step_tokens:
            break  # sorted by what is left, so every later chunk is at least as large
        planned.append(candidate)
        spent += candidate.tokens
    return planned
