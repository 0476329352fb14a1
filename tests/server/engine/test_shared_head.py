"""Decoding rows that share the leading blocks of their tables (a task's long prefix, a cached prompt)
read them once: which rows form such a set, and the numbers they get, equal to every row gathering its
whole table."""

from __future__ import annotations

from dataclasses import replace

import pytest

from server.engine import paged_batch, shared_head
from server.engine.base_model import BaseModel
from server.engine.generation import collect_results
from server.engine.kv_pool import BLOCK_SIZE
from server.engine.prefill_groups import shared_heads
from server.engine.request import GenerationResult
from tests.server.engine.helpers import random_prefix
from tests.server.engine.test_prompt_cache import ask, engine, prompt


def test_rows_sharing_leading_blocks_form_one_set_and_keep_a_tail() -> None:
    tables = {
        0: [5, 6, 7, 20],
        1: [5, 6, 7, 21, 22],
        2: [5, 6, 8, 23],  # agrees with 0 and 1 on two blocks only
        3: [9, 10, 11],  # its own first block
        4: [5, 6],  # the head would leave it no tail
    }
    assert shared_heads(tables, min_blocks=2) == [([0, 1, 2], 2)]
    assert shared_heads(tables, min_blocks=3) == []
    assert shared_heads({0: [5, 6, 7], 1: [5, 6, 7]}, min_blocks=1) == [([0, 1], 2)]
    assert shared_heads({0: [5, 6, 7]}, min_blocks=1) == []


def run_rows(base: BaseModel, requests: list, **config: int) -> list[GenerationResult]:
    core = engine(base, max_batch_size=16, **config)
    for one in requests:
        core.add_request(one)
    return collect_results(core, requests)


def test_rows_reading_a_shared_head_once_get_what_whole_tables_give(
    base: BaseModel, monkeypatch: pytest.MonkeyPatch
) -> None:
    """Rows of one task with a 70-token prefix, some also sharing a 48-token cached prompt head, others on
    the base model sharing only that head, and a row of their own: the tokens and logprobs of every row
    equal those computed with every row gathering its whole table (the shared path really ran)."""
    prefix = random_prefix(base, 70, seed=21)
    system = prompt(30, 3 * BLOCK_SIZE)
    requests = [
        *(ask(f"task{i}", prompt(40 + i, 10 + 3 * i), prefix) for i in range(3)),
        *(ask(f"task-system{i}", prompt(50 + i, 60 + i, system), prefix) for i in range(3)),
        *(ask(f"system{i}", prompt(60 + i, 70 + 5 * i, system)) for i in range(4)),
        ask("alone", prompt(70, 30)),
    ]
    requests = [replace(one, logprobs=2) for one in requests]
    calls = []
    real = shared_head.attend_shared_head

    def counted(*args, **kwargs):
        calls.append(args[3].blocks.numel())
        return real(*args, **kwargs)

    monkeypatch.setattr("server.engine.paged_attention.attend_shared_head", counted)
    warmed = engine(base, max_batch_size=16)  # the system prompt's blocks cached first
    for one in (ask("warm", [*system, 1]), *requests):
        warmed.add_request(one)
    shared = collect_results(warmed, [*requests])
    assert calls and max(calls) >= 4  # the prefix's 5 blocks (+ 3 of the cached prompt) read once

    monkeypatch.setattr(paged_batch, "MIN_SHARED_HEAD_TOKENS", 1 << 30)  # every row its whole table
    calls.clear()
    whole = run_rows(base, requests)
    assert not calls
    for mine, theirs in zip(shared, whole, strict=True):
        assert mine.token_ids == theirs.token_ids, mine.request_id
        for a, b in zip(mine.logprobs, theirs.logprobs, strict=True):
            assert a.logprob == pytest.approx(b.logprob, abs=1e-4)


def test_rows_of_one_task_reserve_its_prefix_once(base: BaseModel) -> None:
    """Eight rows of a 100-token prefix, 26 tokens of their own each, in a 320-token budget: all run at
    once (each paying for the prefix, two would), the pool holds them, and each generates its solo tokens."""
    prefix = random_prefix(base, 100, seed=22)
    requests = [ask(f"r{i}", prompt(80 + i, 20), prefix) for i in range(8)]
    core = engine(base, max_batch_size=8, max_batch_tokens=320)
    for one in requests:
        core.add_request(one)
    first = {o.request_id: o.token_ids for o in core.step()}
    assert core.counts() == {"running": 8, "waiting": 0}
    results = collect_results(core, requests)
    solo = [run_rows(base, [one])[0].token_ids for one in requests]
    assert [first.get(r.request_id, []) + r.token_ids for r in results] == solo
    assert core.stats().kv.blocks_used == 0
