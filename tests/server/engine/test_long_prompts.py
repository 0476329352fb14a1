"""Heavy-tailed prompt lengths: rows are prefilled in length groups and in chunks, and no row's tokens
change for it; a long prompt never stalls the decoding rows."""

from __future__ import annotations

from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import generate
from server.engine.prefill_groups import length_groups
from server.engine.scheduler import SchedulerConfig
from tests.server.engine.helpers import random_prefix, request
from tests.server.engine.test_core import _staggered

LONG_PROMPT = " ".join(f"word{i}" for i in range(30))  # ~145 tokens with the demo tokenizer


def test_a_long_prompt_gets_a_group_of_its_own() -> None:
    lengths = [41] * 15 + [1601]
    groups = length_groups(lengths, lambda n: n)
    assert groups == [[41] * 15, [1601]]


def test_short_prompts_of_mixed_lengths_share_one_group() -> None:
    lengths = [64, 16, 40, 23, 57, 31, 48, 18]
    assert length_groups(lengths, lambda n: n) == [sorted(lengths)]


def test_every_row_lands_in_exactly_one_group_shortest_first() -> None:
    lengths = [1, 900, 3, 3000, 2, 120, 7, 450, 5, 2000]
    groups = length_groups(lengths, lambda n: n)
    assert [n for group in groups for n in group] == sorted(lengths)
    assert len(groups) > 2 and length_groups([], lambda n: n) == []


def test_short_and_long_prompts_admitted_together_match_solo_runs(base: BaseModel) -> None:
    """A long prompt (with and without a prefix) among short ones, admitted in one step and joining a
    running batch later: every row's tokens equal its solo run, on every architecture."""
    prompts = ["hi", "a b", LONG_PROMPT, "ok", LONG_PROMPT + " again", "yes"]
    prefixes = [random_prefix(base, n, seed=i) if n else None for i, n in enumerate([3, 0, 5, 0, 0, 8])]
    requests = [
        request(base, f"r{i}", prompt, prefixes[i], max_new_tokens=6 + i) for i, prompt in enumerate(prompts)
    ]
    lengths = [len(r.prompt_ids) for r in requests]
    assert len(length_groups(lengths, lambda n: n)) == 2  # the workload really is heavy-tailed
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    together = EngineCore(base, SchedulerConfig(max_batch_size=8, max_batch_tokens=8192))
    assert _staggered(together, requests, arrivals=[0] * 6) == solo
    joining = EngineCore(base, SchedulerConfig(max_batch_size=8, max_batch_tokens=8192))
    assert _staggered(joining, requests, arrivals=[0, 0, 2, 2, 2, 3]) == solo


CHUNKED = SchedulerConfig(
    max_batch_size=8, max_batch_tokens=8192, prefill_chunk_tokens=8, prefill_step_tokens=16
)


def test_prompts_prefilled_in_chunks_match_solo_runs(base: BaseModel) -> None:
    """Chunks of 8 tokens, 16 per step: long prompts take many steps, short ones pass them, rows join a
    decoding batch mid-way, and every row's tokens equal its unchunked solo run."""
    prompts = [LONG_PROMPT, "hi", "a b", LONG_PROMPT + " again", "ok", "yes"]
    prefixes = [random_prefix(base, n, seed=i) if n else None for i, n in enumerate([5, 0, 3, 0, 0, 8])]
    requests = [
        request(base, f"r{i}", prompt, prefixes[i], max_new_tokens=6 + i) for i, prompt in enumerate(prompts)
    ]
    assert max(len(r.prompt_ids) for r in requests) > 10 * CHUNKED.prefill_chunk_tokens
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    core = EngineCore(base, CHUNKED)
    assert _staggered(core, requests, arrivals=[0, 0, 1, 2, 5, 9]) == solo
    assert core.rows == [] and core.stats().kv.blocks_used == 0


def test_decoding_rows_get_a_token_every_step_while_a_long_prompt_prefills(llama_base: BaseModel) -> None:
    base = llama_base
    core = EngineCore(base, CHUNKED)
    core.add_request(request(base, "short", "hi", max_new_tokens=40))
    core.step()  # prefilled: it decodes from now on
    long = request(base, "long", LONG_PROMPT, max_new_tokens=4)
    core.add_request(long)
    steps_to_first_token = 0
    while True:
        outputs = {o.request_id: o for o in core.step()}
        steps_to_first_token += 1
        assert len(outputs["short"].token_ids) == 1  # never stalled
        assert core.prefill_tokens_last_step <= CHUNKED.prefill_step_tokens
        if "long" in outputs:
            break
    assert steps_to_first_token == -(-len(long.prompt_ids) // CHUNKED.prefill_chunk_tokens)


def test_rows_of_one_task_hold_its_prefix_once(llama_base: BaseModel) -> None:
    base = llama_base
    prefix = random_prefix(base, 40, seed=9)
    core = EngineCore(base, SchedulerConfig(max_batch_size=16, max_batch_tokens=8192))
    for i in range(12):
        core.add_request(request(base, f"r{i}", f"prompt number {i}", prefix, max_new_tokens=30))
    core.step()
    stats = core.stats().kv
    per_prefix = core.kv.pool.blocks_for(40)
    assert (stats.shared_prefixes, stats.rows_sharing_prefixes, stats.shared_prefix_blocks) == (
        1,
        12,
        per_prefix,
    )
    own = sum(len(r.kv.blocks) for r in core.rows)
    assert stats.blocks_used == per_prefix + own  # 12 rows, one copy of the prefix
