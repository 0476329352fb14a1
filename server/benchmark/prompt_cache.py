"""What a prompt computed once saves (the ``prompt-cache`` section), every ratio measured in the same run.

shared-system   16 clients whose requests share a long system prompt, against the same user turns without
                it: wall time of the 16 on a fresh engine (the prompt computed once, by the first rows)
                and once it is cached
ttft            one request at a time: time to first token with the cached system prompt against a short
                prompt's
chat            a conversation of 8 turns, each resending the whole history: each turn's time to first
                token (flat with the cache, growing without it)
distinct        prompts that share nothing (no hit to find): throughput with the cache on / off
task-prefix     16 rows of one task with a long prefix (the head every row's table begins with) against
                the same rows without a prefix
"""

from __future__ import annotations

import random
import statistics
import time
from collections.abc import Callable
from typing import Any

from prefix_store.prefix import Prefix
from server.benchmark.baselines import Log
from server.benchmark.loops import EngineSystem, closed_loop
from server.benchmark.models import random_prefixes
from server.benchmark.settings import BenchSettings, PromptCacheSpec
from server.benchmark.timeline import percentile
from server.engine.base_model import BaseModel
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams

Tokens = list[int]


class _Prompts:
    """Random token ids of the model's vocabulary, from one seed."""

    def __init__(self, base: BaseModel, seed: int) -> None:
        self.rng, self.vocab = random.Random(seed), base.model.config.vocab_size

    def tokens(self, count: int) -> Tokens:
        return [self.rng.randrange(5, self.vocab) for _ in range(count)]


def _ask(request_id: str, prompt: Tokens, new_tokens: int, prefix: Prefix | None = None) -> GenerationRequest:
    return GenerationRequest(request_id, prompt, prefix, SamplingParams(), new_tokens, ignore_eos=True)


def _engine(base: BaseModel, rows: int, *, prompt_cache: bool = True) -> EngineSystem:
    return EngineSystem(base, max_batch_size=rows, prompt_cache=prompt_cache)


def _rounds(repeats: int, measure: Callable[[int], dict[str, float]]) -> dict[str, Any]:
    """``measure(round)`` ``repeats`` times; the median of each figure and the rounds themselves."""
    rounds = [measure(i) for i in range(repeats)]
    return {**{key: statistics.median(r[key] for r in rounds) for key in rounds[0]}, "rounds": rounds}


def measure_shared_system(base: BaseModel, spec: PromptCacheSpec, repeats: int, log: Log) -> dict[str, Any]:
    """``rows`` clients, one request each, user turns with and without the shared system prompt."""
    prompts = _Prompts(base, 31)

    def measure(round_: int) -> dict[str, float]:
        system = prompts.tokens(spec.system_tokens)
        turns = [prompts.tokens(spec.turn_tokens) for _ in range(2 * spec.rows)]
        alone = [_ask(f"u{i}", turn, spec.new_tokens) for i, turn in enumerate(turns[: spec.rows])]
        shared = [_ask(f"s{i}", [*system, *turn], spec.new_tokens) for i, turn in enumerate(turns)]
        plain = closed_loop(_engine(base, spec.rows), alone, spec.rows).wall_s
        engine = _engine(base, spec.rows)
        cold = closed_loop(engine, shared[: spec.rows], spec.rows)
        warm = closed_loop(engine, shared[spec.rows :], spec.rows)
        figures = {
            "alone_wall_s": plain,
            "cold_wall_s": cold.wall_s,
            "cached_wall_s": warm.wall_s,
            "cold_ttft_p50_s": percentile(cold.ttfts(), 50),
            "cached_ttft_p50_s": percentile(warm.ttfts(), 50),
            "cold_over_alone": cold.wall_s / plain,
            "cached_over_alone": warm.wall_s / plain,
        }
        log(f"prompt-cache shared-system {round_ + 1}/{repeats}: {figures['cold_over_alone']:.2f}x cold")
        return figures

    return _rounds(repeats, measure)


def measure_ttft(base: BaseModel, spec: PromptCacheSpec, repeats: int) -> dict[str, Any]:
    """One request at a time: the short turn alone, then the same turns after the cached system prompt."""
    prompts = _Prompts(base, 32)

    def measure(round_: int) -> dict[str, float]:
        system = prompts.tokens(spec.system_tokens)
        turns = [prompts.tokens(spec.turn_tokens) for _ in range(spec.rows)]
        engine = _engine(base, 1)
        closed_loop(engine, [_ask("warm", [*system, 1], 1)], 1)
        short = closed_loop(engine, [_ask(f"u{i}", t, spec.new_tokens) for i, t in enumerate(turns)], 1)
        cached = closed_loop(
            engine, [_ask(f"s{i}", [*system, *t], spec.new_tokens) for i, t in enumerate(turns)], 1
        )
        short_p50, cached_p50 = percentile(short.ttfts(), 50), percentile(cached.ttfts(), 50)
        return {
            "short_ttft_p50_s": short_p50,
            "cached_ttft_p50_s": cached_p50,
            "ratio": cached_p50 / short_p50,
        }

    return _rounds(repeats, measure)


def measure_chat(base: BaseModel, spec: PromptCacheSpec) -> dict[str, Any]:
    """A conversation of ``chat_turns``: each turn sends the history (every earlier turn and answer) and a
    new user turn, with the cache and without; each turn's time to first token."""
    result: dict[str, Any] = {}
    for name, cache in (("cached", True), ("uncached", False)):
        prompts, engine, history = _Prompts(base, 33), _engine(base, 1, prompt_cache=cache), []
        closed_loop(engine, [_ask("warm", prompts.tokens(spec.turn_tokens), 2)], 1)
        ttfts = []
        for turn in range(spec.chat_turns):
            history += prompts.tokens(spec.turn_tokens)
            engine.submit(_ask(f"turn{turn}", list(history), spec.new_tokens))
            started, first_token = time.perf_counter(), None
            while engine.core.has_work:
                for output in engine.core.step():
                    if output.token_ids and first_token is None:
                        first_token = time.perf_counter()
                    history += output.token_ids  # the answer, resent with the next turn
            ttfts.append(first_token - started)
        result[name] = {
            "ttft_s": ttfts,
            "last_over_first": ttfts[-1] / ttfts[0],
            "history_tokens": len(history),
            "hit_tokens": engine.core.stats().prompt_cache.hit_tokens,
        }
    return result


def measure_distinct(base: BaseModel, spec: PromptCacheSpec, repeats: int) -> dict[str, Any]:
    """Prompts that share nothing, ``rows`` clients: throughput with the cache on / off, run in pairs (which
    runs first alternates)."""
    prompts = _Prompts(base, 34)

    def measure(round_: int) -> dict[str, float]:
        requests = [
            _ask(f"d{i}", prompts.tokens(prompts.rng.randint(64, 256)), spec.new_tokens)
            for i in range(4 * spec.rows)
        ]
        runs = {}
        for cache in (True, False) if round_ % 2 == 0 else (False, True):
            runs[cache] = closed_loop(_engine(base, spec.rows, prompt_cache=cache), requests, spec.rows)
        on, off = runs[True], runs[False]
        return {
            "on_tokens_per_s": on.tokens_per_s,
            "off_tokens_per_s": off.tokens_per_s,
            "on_over_off": on.tokens_per_s / off.tokens_per_s,
        }

    return _rounds(repeats, measure)


def measure_task_prefix(base: BaseModel, spec: PromptCacheSpec, repeats: int, log: Log) -> dict[str, Any]:
    """``rows`` clients on one task whose prefix is each of ``prefix_tokens`` long: throughput against the
    same requests without a prefix, run in pairs."""
    prompts = _Prompts(base, 35)
    prefixes = random_prefixes(base, list(spec.prefix_tokens), seed=36)
    result: dict[str, Any] = {}
    for length, prefix in zip(spec.prefix_tokens, prefixes, strict=True):

        def measure(round_: int, prefix: Prefix = prefix) -> dict[str, float]:
            turns = [prompts.tokens(prompts.rng.randint(16, 48)) for _ in range(2 * spec.rows)]
            requests = [_ask(f"t{i}", t, spec.new_tokens, prefix) for i, t in enumerate(turns)]
            plain = [_ask(f"b{i}", t, spec.new_tokens) for i, t in enumerate(turns)]
            task = closed_loop(_engine(base, spec.rows), requests, spec.rows)
            none = closed_loop(_engine(base, spec.rows), plain, spec.rows)
            return {
                "prefix_tokens_per_s": task.tokens_per_s,
                "none_tokens_per_s": none.tokens_per_s,
                "ratio": task.tokens_per_s / none.tokens_per_s,
            }

        result[str(length)] = _rounds(repeats, measure)
        log(f"prompt-cache task-prefix {length}: {result[str(length)]['ratio']:.2f}")
    return result


def prompt_cache(base: BaseModel, settings: BenchSettings, log: Log) -> dict[str, Any]:
    """Every part of the section (see the module's docstring)."""
    spec, repeats = settings.prompt_cache, settings.repeats
    log("prompt-cache: 16 users sharing a system prompt")
    report: dict[str, Any] = {"spec": spec.__dict__}
    report["shared_system"] = measure_shared_system(base, spec, repeats, log)
    log("prompt-cache: time to first token, one at a time")
    report["ttft"] = measure_ttft(base, spec, repeats)
    log("prompt-cache: a multi-turn chat")
    report["chat"] = measure_chat(base, spec)
    log("prompt-cache: prompts sharing nothing, cache on / off")
    report["distinct"] = measure_distinct(base, spec, repeats)
    log("prompt-cache: rows of one task with a long prefix")
    report["task_prefix"] = measure_task_prefix(base, spec, repeats, log)
    return report
