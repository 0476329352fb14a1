"""Continuous batching in the engine core: rows join and leave between steps, and no row notices."""

from __future__ import annotations

from typing import Any

from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.generation import collect_results, generate
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from tests.server.engine.helpers import random_prefix, request

PROMPTS = [
    "hello world",
    "Summarize the following text in one sentence: the weather today is sunny with a light breeze.",
    "a",
    "Translate the sentence into French.",
    "Write a short poem about the sea.",
    "def add(a, b): return a + b",
]


def _workload(base: BaseModel, sampling: SamplingParams | None = None) -> list[GenerationRequest]:
    prefixes = [random_prefix(base, n, seed=i) if n else None for i, n in enumerate([3, 0, 17, 3, 9, 1])]
    return [
        request(
            base, f"r{i}", PROMPTS[i], prefixes[i], max_new_tokens=[5, 14, 9, 20, 3, 11][i], sampling=sampling
        )
        for i in range(len(PROMPTS))
    ]


def _staggered(
    core: EngineCore, requests: list[GenerationRequest], arrivals: list[int]
) -> dict[str, list[int]]:
    """Add request i at step arrivals[i]; run until all finish; tokens per request."""
    tokens: dict[str, list[int]] = {r.request_id: [] for r in requests}
    finished: set[str] = set()
    step = 0
    while len(finished) < len(requests):
        for r, arrival in zip(requests, arrivals, strict=True):
            if arrival == step:
                core.add_request(r)
        for output in core.step():
            tokens[output.request_id].extend(output.token_ids)
            if output.finish_reason is not None:
                finished.add(output.request_id)
        step += 1
    return tokens


def test_requests_arriving_at_different_steps_match_solo_runs(base: BaseModel) -> None:
    requests = _workload(base)
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    core = EngineCore(base, SchedulerConfig(max_batch_size=4, max_batch_tokens=4096))
    assert _staggered(core, requests, arrivals=[0, 0, 2, 3, 3, 9]) == solo
    assert core.counts() == {"running": 0, "waiting": 0}


def test_seeded_sampling_matches_solo_runs_under_continuous_batching(base: BaseModel) -> None:
    requests = _workload(base, SamplingParams(temperature=0.8, top_p=0.9, seed=77))
    solo = {r.request_id: generate(base, [r])[0].token_ids for r in requests}
    core = EngineCore(base, SchedulerConfig(max_batch_size=3, max_batch_tokens=4096))
    assert _staggered(core, requests, arrivals=[0, 1, 1, 4, 5, 5]) == solo


def test_static_batching_admits_only_into_an_empty_batch(llama_base: BaseModel) -> None:
    requests = _workload(llama_base)
    core = EngineCore(llama_base, SchedulerConfig(max_batch_size=4), static_batching=True)
    for r in requests:
        core.add_request(r)
    core.step()
    assert core.counts() == {"running": 4, "waiting": 2}
    while core.counts()["running"]:
        assert core.counts()["waiting"] == 2  # nobody joins a running static batch
        core.step()
    results = collect_results(core, requests[4:])
    assert [r.token_ids for r in results] == [generate(llama_base, [r])[0].token_ids for r in requests[4:]]


def test_abort_frees_the_row_at_the_next_step(llama_base: BaseModel) -> None:
    core = EngineCore(llama_base)
    keep, drop = (request(llama_base, rid, "hello world", max_new_tokens=50) for rid in ("keep", "drop"))
    core.add_request(keep)
    core.add_request(drop)
    core.step()
    assert len(core.rows) == 2
    core.abort("drop")
    outputs = core.step()
    assert [(o.request_id, o.finish_reason) for o in outputs if o.finish_reason] == [
        ("drop", FinishReason.ABORTED)
    ]
    assert [s.request.request_id for s in core.rows] == ["keep"] and core.counts() == {
        "running": 1,
        "waiting": 0,
    }


def test_deadline_ends_waiting_and_running_requests(llama_base: BaseModel) -> None:
    now = [0.0]
    core = EngineCore(llama_base, SchedulerConfig(max_batch_size=1), clock=lambda: now[0])
    running = request(llama_base, "running", "hello", max_new_tokens=100)
    waiting = request(llama_base, "waiting", "hello", max_new_tokens=100)
    core.add_request(GenerationRequest(**{**running.__dict__, "deadline": 10.0}))
    core.add_request(GenerationRequest(**{**waiting.__dict__, "deadline": 5.0}))
    core.step()
    now[0] = 6.0
    ended = {o.request_id: o.finish_reason for o in core.step() if o.finish_reason}
    assert ended == {"waiting": FinishReason.DEADLINE}
    now[0] = 11.0
    ended = {o.request_id: o.finish_reason for o in core.step() if o.finish_reason}
    assert ended == {"running": FinishReason.DEADLINE}
    assert core.counts() == {"running": 0, "waiting": 0}


def test_stop_sequences_and_eos_end_rows_individually(llama_base: BaseModel) -> None:
    base = llama_base
    free = generate(base, [request(base, "free", "hello world", max_new_tokens=12)])[0]
    stop_text = free.text[len(free.text) // 2 :][:3]
    stopped = request(base, "stopped", "hello world", max_new_tokens=12, stop=(stop_text,))
    results = generate(base, [stopped, request(base, "other", "a", max_new_tokens=12)])
    assert results[0].finish_reason is FinishReason.STOP
    assert results[0].text == free.text[: free.text.index(stop_text)]
    assert results[1].finish_reason is FinishReason.LENGTH and len(results[1].token_ids) == 12


def test_counts_include_the_rows_being_prefilled(llama_base: BaseModel) -> None:
    """Gauges read during a step (from another thread) see the admitted rows while they prefill:
    they are in neither the waiting set nor the running batch until the step ends."""
    core = EngineCore(llama_base, SchedulerConfig(max_batch_size=4))
    seen: list[dict[str, int]] = []
    forward = core.runner.forward

    def observed_forward(batch: Any, **kwargs: Any) -> Any:
        seen.append(core.counts())
        return forward(batch, **kwargs)

    core.runner.forward = observed_forward
    for r in _workload(llama_base)[:3]:
        core.add_request(r)
    core.step()  # the first step only prefills the three
    assert seen == [{"running": 3, "waiting": 0}]
