"""Which rows of a forward pass attend together. A group lays out its rows' queries and gathered keys
padded to its longest row, so one long row among short ones would make every short row attend over the
long one's length (16 rows of 41 tokens and one of 1,601: 25,616 positions for 2,216 real ones). Rows
are therefore grouped by length: sorted, and a longer row opens a new group once the group's padded
positions would exceed ``MAX_PADDING_RATIO`` × its real ones (plus ``SLACK_TOKENS``, so that short rows
of mixed lengths still share one group). Pure Python, no torch."""

from __future__ import annotations

from collections.abc import Callable, Sequence
from typing import TypeVar

Row = TypeVar("Row")

MAX_PADDING_RATIO = 2.0  # padded query positions per real one a group may reach
SLACK_TOKENS = 256  # padding any group may have regardless of the ratio


def length_groups(rows: Sequence[Row], length: Callable[[Row], int]) -> list[list[Row]]:
    """``rows`` in groups, shortest first; each row exactly once."""
    groups: list[list[Row]] = []
    real = 0
    for row in sorted(rows, key=length):
        size = length(row)
        group = groups[-1] if groups else None
        # sorted, so `size` is the group's longest: its padded positions are rows × size
        if group is not None and (len(group) + 1) * size <= MAX_PADDING_RATIO * (real + size) + SLACK_TOKENS:
            group.append(row)
            real += size
        else:
            groups.append([row])
            real = size
    return groups


def shared_heads(tables: dict[int, Sequence[int]], min_blocks: int) -> list[tuple[list[int], int]]:
    """Rows whose block tables begin with the same blocks (a task's prefix, a cached system prompt), as
    ``(rows, head blocks)``: rows with the same first block whose tables agree on at least ``min_blocks``
    leading blocks, two rows at least. Each row in one set at most; the rest are left out."""
    by_first: dict[int, list[int]] = {}
    for row, table in tables.items():
        if len(table) > min_blocks:  # a head and a tail of its own
            by_first.setdefault(table[0], []).append(row)
    found = []
    for rows in by_first.values():
        if len(rows) < 2:
            continue
        first = tables[rows[0]]
        common = min(len(tables[row]) - 1 for row in rows)  # every row keeps a tail
        for row in rows[1:]:
            table = tables[row]
            common = next((i for i in range(common) if table[i] != first[i]), common)
        if common >= min_blocks:
            found.append((sorted(rows), common))
    return found


def pass_groups(
    tables: Sequence[Sequence[int]], fed: Sequence[int], block_size: int, min_head_blocks: int
) -> list[tuple[list[int], int]]:
    """The attention groups of one forward pass's rows (``tables[i]``: row ``i``'s block table, ``fed[i]``:
    its inputs) as ``(rows, head blocks)``: decoding rows that share at least ``min_head_blocks`` leading
    blocks read them once (``shared_heads``); the other decoding rows are grouped by table length, prompt
    chunks by their length. (A prompt chunk's queries amortise their gather already, and on the CPU SDPA's
    fused kernel beats the shared head's separate products for them: measured 0.78 vs 0.92 of the
    throughput without a prefix for 16 rows of a 200-token prefix.)"""
    decoding = [i for i in range(len(fed)) if fed[i] == 1]
    heads = shared_heads({i: tables[i] for i in decoding}, min_head_blocks)
    sharing = {i for rows, _ in heads for i in rows}
    alone = [i for i in decoding if i not in sharing]
    prefilling = [i for i in range(len(fed)) if fed[i] > 1]
    return [
        *heads,
        *((group, 0) for group in length_groups(alone, lambda i: len(tables[i]) * block_size)),
        *((group, 0) for group in length_groups(prefilling, fed.__getitem__)),
    ]
