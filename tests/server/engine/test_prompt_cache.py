"""Automatic prompt caching in the engine: a prompt's full blocks computed once are found by later requests
of the same root, and what they generate is exactly what they generate without the cache (greedy and
seeded, with prefixes, soft prompts and base rows mixed; prompts sharing none to all of their full blocks;
a hit ending inside a prefill chunk; rows joining while others decode; eviction under a small pool); and
nothing is found across tenants, conditionings (a prefix's content, not the object) or cache salts."""

from __future__ import annotations

import random
from collections.abc import Sequence
from dataclasses import replace

import torch

from prefix_store.prefix import Prefix
from prefix_store.soft_prompt import SoftPrompt
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import collect_results
from server.engine.kv_pool import BLOCK_SIZE
from server.engine.request import GenerationRequest, GenerationResult
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.engine.soft_prompts import soft_prompt_prefix
from tests.server.engine.helpers import random_prefix

NEW_TOKENS = 6


def prompt(seed: int, length: int, head: Sequence[int] = ()) -> list[int]:
    """``head`` then random token ids, ``length`` in all."""
    rng = random.Random(seed)
    return [*head, *(rng.randrange(5, 200) for _ in range(length - len(head)))]


def ask(
    request_id: str,
    prompt_ids: list[int],
    prefix: Prefix | None = None,
    *,
    tenant: str = "default",
    salt: str | None = None,
    sampling: SamplingParams | None = None,
) -> GenerationRequest:
    return GenerationRequest(
        request_id=request_id,
        prompt_ids=prompt_ids,
        prefix=prefix,
        sampling=sampling or SamplingParams(),
        max_new_tokens=NEW_TOKENS,
        ignore_eos=True,
        tenant=tenant,
        cache_salt=salt,
    )


def engine(base: BaseModel, *, prompt_cache: bool = True, **config: int) -> EngineCore:
    scheduler = SchedulerConfig(**{"max_batch_size": 8, "max_batch_tokens": 4096, **config})
    return EngineCore(base, scheduler, prompt_cache=prompt_cache)


def run(core: EngineCore, requests: Sequence[GenerationRequest]) -> list[GenerationResult]:
    for one in requests:
        core.add_request(one)
    return collect_results(core, requests)


def test_cached_blocks_give_the_tokens_computed_ones_give(base: BaseModel) -> None:
    """Warm the cache with one batch, then run prompts sharing 0, 1, 2 and all of their full blocks with it,
    on a prefix, a soft prompt and the base model, greedy and seeded: the same tokens as a cold engine."""
    prefix = random_prefix(base, 5, seed=1)
    embeddings = torch.randn(3, base.geometry.embedding_dim, generator=torch.Generator().manual_seed(2))
    soft = soft_prompt_prefix(base, SoftPrompt(embeddings.to(base.dtype)))
    head = prompt(0, 2 * BLOCK_SIZE + 8)  # 40 tokens: 2 full blocks, then 8
    warm = [
        ask(f"warm-{name}", head, conditioning)
        for name, conditioning in (("p", prefix), ("s", soft), ("b", None))
    ]
    seeded = SamplingParams(temperature=0.9, seed=11)
    later = [
        ask("none", prompt(1, 40)),  # a first token of its own: no block in common
        ask("one", prompt(2, 40, head[:BLOCK_SIZE]), prefix),
        ask("two", prompt(3, 45, head[: 2 * BLOCK_SIZE]), soft),
        ask("all", head, None, sampling=seeded),  # the whole prompt: all but its last token's block
        ask("all-longer", [*head, 7, 8, 9], prefix),
        ask("exact", head[: 2 * BLOCK_SIZE], None),  # 32 tokens: the last token's block is computed
    ]
    cached = engine(base)
    run(cached, warm)
    results = run(cached, later)
    assert [r.cached_tokens for r in results] == [0, 16, 32, 32, 32, 16]
    cold = run(engine(base, prompt_cache=False), later)
    assert [r.token_ids for r in results] == [r.token_ids for r in cold]
    assert all(r.cached_tokens == 0 for r in cold)
    stats = cached.stats().prompt_cache
    assert stats.hit_tokens == 128 and stats.queried_tokens == 3 * 40 + 40 + 40 + 45 + 40 + 43 + 32


def test_a_hit_ending_inside_a_prefill_chunk_and_rows_joining_while_others_decode(base: BaseModel) -> None:
    """Chunks of 24 tokens (not a block's multiple), a long prompt found cached for 64 of its 100 tokens
    joining two rows that are decoding: every row's tokens are those of its solo cold run."""
    head = prompt(4, 100)
    cached = engine(base, prefill_chunk_tokens=24, prefill_step_tokens=48)
    run(cached, [ask("warm", head)])
    decoding = [ask(f"d{i}", prompt(10 + i, 20)) for i in range(2)]
    for one in decoding:
        cached.add_request(one)
    early = [output for _ in range(3) for output in cached.step()]  # both rows decode
    assert {o.request_id for o in early if o.token_ids} == {"d0", "d1"}
    joining = ask("join", [*head[:80], *prompt(5, 30)])
    cached.add_request(joining)
    results = collect_results(cached, [*decoding, joining])
    assert results[-1].cached_tokens == 5 * BLOCK_SIZE
    solo = [run(engine(base, prompt_cache=False), [one])[0].token_ids for one in (*decoding, joining)]
    before = {name: [t for o in early if o.request_id == name for t in o.token_ids] for name in ("d0", "d1")}
    assert [before["d0"] + results[0].token_ids, before["d1"] + results[1].token_ids] == solo[:2]
    assert results[2].token_ids == solo[2]


def test_eviction_under_a_small_pool_while_rows_run(base: BaseModel) -> None:
    """A pool of about two rows' worth: many distinct prompts evict each other's cached blocks, rows keep
    running, nothing runs out, and a prompt whose blocks survived is still found."""
    core = engine(base, max_batch_size=2, max_batch_tokens=192)
    prompts = [prompt(20 + i, 64) for i in range(12)]
    results = run(core, [ask(f"r{i}", p) for i, p in enumerate(prompts)])
    assert core.stats().kv.evictions > 0 and all(r.cached_tokens == 0 for r in results)
    cold = run(
        engine(base, prompt_cache=False, max_batch_size=2, max_batch_tokens=192), [ask("x", prompts[-1])]
    )
    again = run(core, [ask("again", prompts[-1])])[0]  # the latest blocks are the last evicted
    assert again.cached_tokens == 48 and again.token_ids == cold[0].token_ids
    assert core.stats().kv.blocks_used == 0


def test_nothing_is_found_across_tenants_conditionings_or_salts(base: BaseModel) -> None:
    head = prompt(6, 40)
    prefix = random_prefix(base, 4, seed=3)
    same_content = Prefix(prefix.keys.clone(), prefix.values.clone())  # another object, the same numbers
    core = engine(base)
    run(core, [ask("warm", head, prefix, tenant="acme", salt="s1")])
    cases = {
        "other tenant": ask("t", head, prefix, tenant="globex", salt="s1"),
        "other salt": ask("s", head, prefix, tenant="acme", salt="s2"),
        "no salt": ask("n", head, prefix, tenant="acme"),
        "base model": ask("b", head, None, tenant="acme", salt="s1"),
        "other prefix": ask("o", head, random_prefix(base, 4, seed=4), tenant="acme", salt="s1"),
    }
    for name, case in cases.items():
        assert run(core, [case])[0].cached_tokens == 0, name
    assert run(core, [ask("same", head, same_content, tenant="acme", salt="s1")])[0].cached_tokens == 32


def test_a_reset_drops_one_tenants_blocks_only(base: BaseModel) -> None:
    head = prompt(7, 40)
    core = engine(base)
    run(core, [ask("a", head, tenant="acme"), ask("g", head, tenant="globex")])
    dropped = core.prompt_cache.on_engine_thread(lambda kv: kv.forget("acme"))
    core.step()
    assert dropped.result(timeout=5) == 2
    assert run(core, [ask("a2", head, tenant="acme")])[0].cached_tokens == 0
    assert run(core, [ask("g2", head, tenant="globex")])[0].cached_tokens == 32


def test_prompt_logprobs_are_computed_not_found(base: BaseModel) -> None:
    head = prompt(8, 40)
    core = engine(base)
    run(core, [ask("warm", head)])
    scoring = replace(ask("score", head), prompt_logprobs=0, max_new_tokens=0)
    (result,) = run(core, [scoring])
    assert result.cached_tokens == 0 and len(result.prompt_logprobs) == 40
    (cold,) = run(engine(base, prompt_cache=False), [scoring])
    assert [e and e.logprob for e in result.prompt_logprobs] == [
        e and e.logprob for e in cold.prompt_logprobs
    ]


def test_rows_admitted_together_compute_a_shared_prompt_head_once(base: BaseModel) -> None:
    """Four requests of one 40-token prompt in one step (the samples of one request, or users of one system
    prompt arriving together): the first computes its two full blocks, the others wait a step or two and
    find them, generating what they would have computed."""
    head = prompt(9, 40)
    core = engine(base)
    requests = [ask(f"s{i}", head, sampling=SamplingParams(temperature=0.8, seed=i)) for i in range(4)]
    results = run(core, requests)
    assert [r.cached_tokens for r in results] == [0, 32, 32, 32]
    assert core.stats().prefill_tokens == 40 + 3 * 8
    cold = run(engine(base, prompt_cache=False), requests)
    assert [r.token_ids for r in results] == [r.token_ids for r in cold]


def test_a_row_waiting_for_anothers_blocks_computes_them_if_that_one_leaves(base: BaseModel) -> None:
    head = prompt(10, 64)
    core = engine(base, prefill_chunk_tokens=16, prefill_step_tokens=16)  # one block a step
    leader, follower = ask("leader", head), ask("follower", [*head, 1, 2, 3])
    core.add_request(leader)
    core.step()  # the leader's first block
    core.add_request(follower)
    core.step()  # the follower finds one block and waits for the next, which the leader computes
    assert [r.request_id for r in core.rows] == ["leader", "follower"] and core.rows[1].kv is None
    core.abort("leader")  # gone with two of its four blocks named: the follower computes the other two
    (result,) = collect_results(core, [follower])
    assert result.cached_tokens == 32
    assert result.token_ids == run(engine(base, prompt_cache=False), [follower])[0].token_ids
