"""The engine against what a user could otherwise run, on one workload, interleaved and repeated:

engine-mixed        the engine, tasks round-robin over prefixes of 4-32 virtual tokens
engine-one-task     the same requests all on ONE prefix of the mixed prefixes' mean length
engine-extras       the mixed requests with a quarter asking for more: logprobs=5 (1 in 8), a JSON schema
                    (another 1 in 8)
engine-soft-prompts the mixed requests with every other task a soft prompt of the same length, served as the
                    keys and values its virtual tokens give (computed at load, untimed: that cost per task
                    is in its summary, beside a deep prefix's decode and cast)
peft-serial         PEFT one request at a time
peft-grouped        PEFT one batch per task, tasks one after another
engine-varied       the engine on a second workload whose max_new_tokens vary 8-128
static-varied       the same engine admitting requests only into an empty batch (static batching)
*-open              the varied pair again with Poisson arrivals (open loop)
"""

from __future__ import annotations

import statistics
from collections import defaultdict
from collections.abc import Callable
from dataclasses import replace
from typing import Any

from server.benchmark.loops import EngineSystem, closed_loop, open_loop
from server.benchmark.models import random_prefixes
from server.benchmark.peft_baseline import PeftSystem, peft_tasks
from server.benchmark.settings import BenchSettings
from server.benchmark.soft_prompt_mix import with_soft_prompts
from server.benchmark.timeline import Timeline, summarize
from server.benchmark.workload import engine_requests, sample_shapes
from server.engine.base_model import BaseModel
from server.engine.grammar import GrammarCompiler
from server.engine.request import GenerationRequest

Log = Callable[[str], None]


# what the schema rows of engine-extras must follow
EXTRAS_SCHEMA = {
    "type": "object",
    "properties": {"answer": {"type": "string"}, "score": {"type": "integer"}},
    "required": ["answer", "score"],
}


def with_extras(base: BaseModel, requests: list[GenerationRequest]) -> list[GenerationRequest]:
    """``requests`` with every 8th asking for its tokens' logprobs and 5 alternatives, and every 8th from
    the 5th constrained to ``EXTRAS_SCHEMA`` (compiled once, as the server caches it)."""
    grammar = GrammarCompiler(base.tokenizer, base.eos_token_ids).json_schema(EXTRAS_SCHEMA)
    extras = {0: {"logprobs": 5}, 4: {"grammar": grammar}}
    return [replace(request, **extras.get(i % 8, {})) for i, request in enumerate(requests)]


def mix_lengths(tasks: int) -> list[int]:
    """Prefix lengths of the mixed tasks: spread evenly over 4-32 virtual tokens."""
    return [round(4 + 28 * i / max(tasks - 1, 1)) for i in range(tasks)]


def run_baselines(base: BaseModel, settings: BenchSettings, log: Log) -> dict[str, dict[str, Any]]:
    """Each system's ``summarize``: its median of ``settings.repeats`` interleaved runs (open loop: one)."""
    lengths = mix_lengths(settings.tasks)
    peft_models, prefixes = peft_tasks(base.model, lengths)
    (mean_prefix,) = random_prefixes(base, [round(statistics.mean(lengths))], seed=7)
    vocab = base.model.config.vocab_size
    mixed = engine_requests(sample_shapes(settings.workload, sorted(prefixes)), prefixes, vocab_size=vocab)
    one_task = [replace(r, prefix=mean_prefix, task_id="mean") for r in mixed]
    extras = with_extras(base, mixed)
    soft_tasks, soft_load = with_soft_prompts(base, prefixes, seed=11)
    soft = [replace(r, prefix=soft_tasks[r.task_id]) for r in mixed]
    log(
        f"baselines: {soft_load['soft_prompt_tasks']} soft prompts encoded at "
        f"{soft_load['soft_prompt_encode_ms']:.1f} ms per task (a deep prefix's decode and cast: "
        f"{soft_load['prefix_decode_cast_ms']:.2f} ms)"
    )
    varied_spec = replace(settings.workload, new_tokens=(8, 128), seed=settings.workload.seed + 1)
    varied = engine_requests(sample_shapes(varied_spec, sorted(prefixes)), prefixes, vocab_size=vocab)
    concurrency = settings.concurrency

    def engine(static: bool = False) -> EngineSystem:
        return EngineSystem(base, max_batch_size=concurrency, static=static)

    closed_loop(engine(), mixed[:concurrency], concurrency)  # warm-up
    systems: dict[str, Callable[[], Timeline]] = {
        "engine-mixed": lambda: closed_loop(engine(), mixed, concurrency),
        "engine-one-task": lambda: closed_loop(engine(), one_task, concurrency),
        "engine-extras": lambda: closed_loop(engine(), extras, concurrency),
        "engine-soft-prompts": lambda: closed_loop(engine(), soft, concurrency),
        "peft-serial": lambda: closed_loop(
            PeftSystem(base.model, peft_models, grouped=False), mixed, concurrency
        ),
        "peft-grouped": lambda: closed_loop(
            PeftSystem(base.model, peft_models, grouped=True), mixed, concurrency
        ),
        "engine-varied": lambda: closed_loop(engine(), varied, concurrency),
        "static-varied": lambda: closed_loop(engine(static=True), varied, concurrency),
    }
    repeated: dict[str, list[Timeline]] = defaultdict(list)
    for repeat in range(settings.repeats):  # interleaved: drift in machine speed hits every system alike
        for name, run in systems.items():
            repeated[name].append(run())
            log(
                f"baselines {repeat + 1}/{settings.repeats}: {name} {repeated[name][-1].tokens_per_s:.1f} tok/s"
            )
    results = {name: summarize(timelines) for name, timelines in repeated.items()}
    results["engine-soft-prompts"] |= soft_load
    # default arrival rate: 70% of the continuous engine's capacity (a busy server, not a saturated one)
    mean_new_tokens = statistics.mean(r.max_new_tokens for r in varied)
    rate = settings.arrival_rate or 0.7 * results["engine-varied"]["tokens_per_s"] / mean_new_tokens
    for name, static in (("engine-varied-open", False), ("static-varied-open", True)):
        results[name] = {**summarize([open_loop(engine(static=static), varied, rate)]), "arrival_rate": rate}
    log(f"baselines: open loop at {rate:.2f} requests/s done")
    return results
