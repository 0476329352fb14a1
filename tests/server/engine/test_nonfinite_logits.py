"""A row whose logits turn non-finite (a prefix whose values overflow in attention, built here in-process,
past the upload's magnitude bound) ends with an error and no tokens; the other rows of its passes go on
and give their solo runs' tokens, greedy or sampled.

On the demo model in float32, prefix values of 1e19 to 1e37 give logits that are all exactly zero (each
RMSNorm's float32 sum of squares overflows to inf and rsqrt(inf) = 0), which are finite: the upload's
magnitude bound refuses those. From 1e38 (still finite in float32) the scores overflow and the logits are
NaN: that is what the engine must catch."""

from __future__ import annotations

import logging
from dataclasses import replace

import pytest
import torch

from prefix_store.prefix import Prefix
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import collect_results, generate
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from tests.server.engine.helpers import random_prefix, request

PROMPTS = ["hello world", "Summarize the following text in one sentence: the weather is sunny.", "a"]
OVERFLOW = 1e38  # finite in float32 (largest 3.4e38); keys and values this large turn the logits into NaN


def overflowing_prefix(base: BaseModel, num_virtual_tokens: int = 4) -> Prefix:
    """A float32 prefix of values ±1e38, every one finite: it passes no upload, and makes its row's
    logits NaN."""
    prefix = random_prefix(base, num_virtual_tokens, seed=99)  # [layers, kv_heads, P, head_dim] each
    keys, values = prefix.keys.sign() * OVERFLOW, prefix.values.sign() * OVERFLOW
    assert torch.isfinite(keys).all() and torch.isfinite(values).all()
    return Prefix(keys, values)


def healthy_requests(base: BaseModel, sampling: SamplingParams | None = None) -> list[GenerationRequest]:
    """A prefixed row and a bare row, of different prompt lengths."""
    return [
        request(
            base, "prefixed", PROMPTS[0], random_prefix(base, 3, seed=1), max_new_tokens=8, sampling=sampling
        ),
        request(base, "bare", PROMPTS[1], max_new_tokens=6, sampling=sampling),
    ]


def test_the_overflowing_prefix_does_make_the_logits_non_finite(llama_base: BaseModel) -> None:
    """The premise of this file: today's model gives NaN logits for such a row (checked on the runner)."""
    core = EngineCore(llama_base, SchedulerConfig(max_batch_size=1, max_batch_tokens=1024))
    record = request(llama_base, "hostile", PROMPTS[2], overflowing_prefix(llama_base))
    kv = core.kv.open(record.prefix, None)
    batch = core.kv.batch([kv], [list(record.prompt_ids)])
    logits = core.runner.forward(batch)  # [1, V]
    assert not torch.isfinite(logits).all()


def test_a_row_with_non_finite_logits_ends_with_an_error_and_the_others_match_their_solo_runs(
    base: BaseModel, caplog: pytest.LogCaptureFixture
) -> None:
    """On every architecture (Llama, GPT-2, Qwen2)."""
    healthy = healthy_requests(base)
    solo = [generate(base, [r])[0] for r in healthy]
    hostile = request(base, "hostile", PROMPTS[2], overflowing_prefix(base), max_new_tokens=5)
    with caplog.at_level(logging.WARNING, logger="server.engine.core"):
        results = generate(base, [healthy[0], hostile, healthy[1]])
    assert results[1].finish_reason is FinishReason.ERROR
    assert results[1].token_ids == [] and results[1].text == ""
    for got, want in zip([results[0], results[2]], solo, strict=True):
        assert got.token_ids == want.token_ids and len(got.token_ids) > 0
        assert got.finish_reason is want.finish_reason is FinishReason.LENGTH
    warnings = [r.getMessage() for r in caplog.records if r.levelno == logging.WARNING]
    assert any("request hostile" in message and "not finite" in message for message in warnings)


def test_seeded_sampled_rows_are_unaffected(llama_base: BaseModel) -> None:
    """Sampled rows share the pass's vectorised sampling with the hostile row, whose NaN logits must never
    reach it (they would pick an arbitrary token): the hostile row ends, the others keep their seeded draws."""
    sampling = SamplingParams(temperature=0.9, top_p=0.95, seed=5)
    healthy = healthy_requests(llama_base, sampling)
    solo = [generate(llama_base, [r])[0].token_ids for r in healthy]
    hostile = request(
        llama_base, "hostile", PROMPTS[2], overflowing_prefix(llama_base), max_new_tokens=5, sampling=sampling
    )
    results = generate(llama_base, [hostile, *healthy])
    assert results[0].finish_reason is FinishReason.ERROR and results[0].token_ids == []
    assert [r.token_ids for r in results[1:]] == solo
    assert all(r.finish_reason is FinishReason.LENGTH for r in results[1:])


def test_a_hostile_row_joining_a_decoding_batch_mid_prompt_ends_at_its_first_chunk(
    llama_base: BaseModel,
) -> None:
    """Continuous batching with chunked prefill: the hostile row joins while the others decode, and ends at
    the end of its first prompt chunk (a pass that samples no token for it), leaving its blocks behind."""
    healthy = healthy_requests(llama_base)
    solo = {r.request_id: generate(llama_base, [r])[0].token_ids for r in healthy}
    long_prompt = " ".join(["the weather is sunny with a light breeze"] * 8)
    hostile = request(llama_base, "hostile", long_prompt, overflowing_prefix(llama_base), max_new_tokens=5)
    chunk = 8
    assert len(hostile.prompt_ids) > 2 * chunk
    config = SchedulerConfig(max_batch_size=4, max_batch_tokens=4096, prefill_chunk_tokens=chunk)
    core = EngineCore(llama_base, config)
    for r in healthy:
        core.add_request(r)
    outputs = core.step() + core.step()  # both healthy rows are decoding now
    assert len(core.rows) == 2
    core.add_request(hostile)
    outputs += core.step()  # the hostile row's first chunk
    ended = [o for o in outputs if o.request_id == "hostile"]
    assert [o.finish_reason for o in ended] == [FinishReason.ERROR] and ended[0].token_ids == []
    assert {r.request_id for r in core.rows} == {"prefixed", "bare"}  # it left the batch
    results = collect_results(core, healthy)
    tokens = {
        r.request_id: [t for o in outputs if o.request_id == r.request_id for t in o.token_ids]
        for r in healthy
    }
    assert {
        r.request_id: tokens[r.request_id] + res.token_ids for r, res in zip(healthy, results, strict=True)
    } == solo
    assert core.counts() == {"running": 0, "waiting": 0}
    assert core.kv.stats().blocks_used == 0  # every block given back, the hostile row's included


def test_a_row_scoring_its_prompt_ends_with_an_error_and_no_logprobs(llama_base: BaseModel) -> None:
    """Prompt logprobs (a pass of its own, every position's logits) from NaN logits would be NaN: the row
    ends with an error instead, with none, even when it asked for no new tokens."""
    for new_tokens in (0, 3):
        hostile = replace(
            request(
                llama_base, "hostile", PROMPTS[1], overflowing_prefix(llama_base), max_new_tokens=new_tokens
            ),
            prompt_logprobs=2,
            logprobs=2,
        )
        (result,) = generate(llama_base, [hostile])
        assert result.finish_reason is FinishReason.ERROR
        assert result.token_ids == [] and not result.prompt_logprobs and not result.logprobs
