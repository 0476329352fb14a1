"""Chunked prefill's policy: the oldest prompt always advances, then the shortest, within the step's budget."""

from __future__ import annotations

from server.engine.prefill_plan import Chunk, plan_chunks


def _plan(lengths: list[int], chunk: int = 256, step: int = 512) -> list[Chunk[int]]:
    return plan_chunks(list(range(len(lengths))), lambda i: lengths[i], chunk_tokens=chunk, step_tokens=step)


def test_a_long_prompt_advances_one_chunk_and_short_ones_fill_the_rest_of_the_budget() -> None:
    lengths = [1601] + [41] * 15  # the long prompt arrived first
    plan = _plan(lengths)
    assert plan[0] == Chunk(0, 256, last=False)
    assert [c.row for c in plan[1:]] == list(range(1, 7))  # 6 × 41 = 246 more tokens fit in 512
    assert all(c.tokens == 41 and c.last for c in plan[1:])
    assert sum(c.tokens for c in plan) <= 512


def test_shortest_remaining_first_after_the_oldest() -> None:
    plan = _plan([300, 700, 20, 120, 5])
    assert [(c.row, c.tokens, c.last) for c in plan] == [
        (0, 256, False),
        (4, 5, True),
        (2, 20, True),
        (3, 120, True),
    ]


def test_the_oldest_row_advances_even_when_its_chunk_alone_exceeds_the_budget() -> None:
    assert _plan([5000, 3], chunk=1024, step=512) == [Chunk(0, 1024, last=False)]


def test_every_prompt_is_fed_whole_and_in_order_of_its_chunks() -> None:
    """Run the plan to the end: each row's chunks are 256-token pieces of its own prompt (boundaries that
    do not depend on the neighbours) and nothing starves."""
    left = {i: n for i, n in enumerate([1000, 1, 257, 256, 90, 3000])}
    fed: dict[int, list[int]] = {i: [] for i in left}
    while left:
        plan = plan_chunks(list(left), lambda i: left[i], chunk_tokens=256, step_tokens=512)
        assert sum(c.tokens for c in plan) >= min(256, sum(left.values()))  # a step never idles
        for c in plan:
            fed[c.row].append(c.tokens)
            left[c.row] -= c.tokens
            assert c.last == (left[c.row] == 0)
            if c.last:
                del left[c.row]
    assert fed[0] == [256, 256, 256, 232] and fed[2] == [256, 1] and fed[1] == [1]
    assert fed[5] == [256] * 11 + [184]
    assert plan_chunks([], len, chunk_tokens=1, step_tokens=1) == []
