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
