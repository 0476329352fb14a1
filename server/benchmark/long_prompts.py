"""Long prompts among short ones, and what the paged KV cache holds (the ``long-prompts`` section).

mix              15 short prompts and 1 long one submitted together, against the same requests run apart
                 (the shorts alone, then the long one alone): wall time together / apart, and the short
                 requests' p50 latency together / alone
join             rows decoding while a long prompt joins: the worst gap between two of their tokens, with
                 chunked prefill (the server's settings) and with the whole prompt prefilled in one step
memory           one long request in a fresh process: its peak memory growth against its keys and values
                 plus one prefill chunk's activations
shared-prefix    rows of one task: the bytes their prefix takes in the KV pool, against one copy per row
decode           a decode pass at a batch of 16 in the paged layout (its block tables, groups and masks built
                 from the rows included) against the same rows in the dense layout: one transformers
                 ``DynamicCache`` for the batch, every row padded to the longest prefix + prompt; the two
                 run in lockstep (and the whole engine step, with scheduling, sampling and detokenizing)
"""

from __future__ import annotations

import json
import random
import statistics
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import replace
from pathlib import Path
from typing import Any

import torch

from prefix_store.prefix import Prefix
from server.benchmark.baselines import Log
from server.benchmark.loops import EngineSystem, closed_loop
from server.benchmark.models import build_model, random_prefixes
from server.benchmark.settings import BenchSettings, LongPromptSpec
from server.benchmark.timeline import Timeline, percentile
from server.engine.base_model import BaseModel
from server.engine.core import EngineCore
from server.engine.engine_request import EngineRequest
from server.engine.kv_pool import BLOCK_SIZE, KVPool
from server.engine.request import GenerationRequest
from server.engine.sampling import SamplingParams
from server.engine.scheduler import SchedulerConfig
from server.training.prefill_batch import BatchRow, PrefillBatch


def _request(
    request_id: str,
    tokens: int,
    new_tokens: int,
    rng: random.Random,
    vocab: int,
    prefix: Prefix | None = None,
) -> GenerationRequest:
    prompt = [rng.randrange(5, vocab) for _ in range(tokens)]
    return GenerationRequest(request_id, prompt, prefix, SamplingParams(), new_tokens, ignore_eos=True)


def _latencies(timeline: Timeline, prefix: str) -> list[float]:
    return [timeline.finished[r] - timeline.submitted[r] for r in timeline.finished if r.startswith(prefix)]


def measure_mix(base: BaseModel, spec: LongPromptSpec, repeats: int, log: Log) -> dict[str, Any]:
    """Together vs apart, ``repeats`` interleaved rounds; the medians of the round-by-round ratios."""
    rng, vocab = random.Random(5), base.model.config.vocab_size
    long = _request("long", spec.long_tokens, spec.new_tokens, rng, vocab)
    shorts = [
        _request(f"short{i}", spec.short_tokens, spec.new_tokens, rng, vocab)
        for i in range(spec.short_requests)
    ]
    rows = len(shorts) + 1

    def run(requests: list[GenerationRequest]) -> Timeline:
        return closed_loop(EngineSystem(base, max_batch_size=rows), requests, len(requests))

    run(shorts[:2])  # warm-up
    rounds = []
    for _ in range(repeats):
        together = run([long, *shorts])  # the long prompt first: the oldest, as in a FIFO queue
        alone_short, alone_long = run(shorts), run([long])
        rounds.append(
            {
                "together_s": together.wall_s,
                "apart_s": alone_short.wall_s + alone_long.wall_s,
                "short_p50_together_s": percentile(_latencies(together, "short"), 50),
                "short_p50_alone_s": percentile(_latencies(alone_short, "short"), 50),
                "long_together_s": _latencies(together, "long")[0],
                "long_alone_s": _latencies(alone_long, "long")[0],
            }
        )
        log(
            f"long-prompts mix: together {rounds[-1]['together_s']:.2f} s, apart {rounds[-1]['apart_s']:.2f} s"
        )
    median = {key: statistics.median(r[key] for r in rounds) for key in rounds[0]}
    return {
        **median,
        "together_over_apart": statistics.median(r["together_s"] / r["apart_s"] for r in rounds),
        "short_p50_together_over_alone": statistics.median(
            r["short_p50_together_s"] / r["short_p50_alone_s"] for r in rounds
        ),
        "rounds": rounds,
    }


def measure_join(base: BaseModel, spec: LongPromptSpec, config: SchedulerConfig) -> dict[str, Any]:
    """Rows decode; a long prompt joins. Each step gives every decoding row one token, so the gap between
    two of their tokens is a step's duration: the worst step until the long prompt's first token, against
    the median step before it joined, with ``config``'s chunking and with the prompt prefilled at once."""
    rng, vocab = random.Random(6), base.model.config.vocab_size
    result: dict[str, Any] = {}
    one_step = replace(
        config, prefill_chunk_tokens=spec.joining_tokens, prefill_step_tokens=spec.joining_tokens
    )
    for name, scheduler in (("chunked", config), ("one_step", one_step)):
        core = EngineCore(
            base, replace(scheduler, max_batch_size=spec.short_requests + 1, max_batch_tokens=1 << 16)
        )
        for i in range(spec.short_requests):
            core.add_request(
                _request(f"row{i}", spec.short_tokens, 1000, rng, vocab)
            )  # aborted once measured
        while len(core.rows) < spec.short_requests or any(r.prompt_left for r in core.rows):
            core.step()
        before = []
        for _ in range(5):
            started = time.perf_counter()
            core.step()
            before.append(time.perf_counter() - started)
        core.add_request(_request("joining", spec.joining_tokens, 1, rng, vocab))
        during = []
        while True:
            started = time.perf_counter()
            outputs = core.step()
            during.append(time.perf_counter() - started)
            if any(o.request_id == "joining" for o in outputs):
                break
        for record in core.rows:
            core.abort(record.request_id)
        core.step()
        result[name] = {
            "worst_gap_ms": max(during) * 1e3,
            "median_gap_before_ms": statistics.median(before) * 1e3,
            "steps_to_join": len(during),
            "chunk_tokens": scheduler.prefill_chunk_tokens,
            "step_tokens": scheduler.prefill_step_tokens,
        }
    result["one_step_over_chunked_worst_gap"] = (
        result["one_step"]["worst_gap_ms"] / result["chunked"]["worst_gap_ms"]
    )
    return result


def measure_shared_prefix(base: BaseModel, spec: LongPromptSpec) -> dict[str, Any]:
    """``shared_rows`` rows of one task, all decoding: the pool's prefix bytes against one copy per row."""
    rng, vocab = random.Random(7), base.model.config.vocab_size
    (prefix,) = random_prefixes(base, [spec.shared_prefix_tokens], seed=11)
    core = EngineCore(base, SchedulerConfig(max_batch_size=spec.shared_rows, max_batch_tokens=1 << 16))
    for i in range(spec.shared_rows):
        core.add_request(_request(f"row{i}", 16 + i, 8, rng, vocab, prefix))
    while any(r.prompt_left for r in core.rows) or len(core.rows) < spec.shared_rows:
        core.step()
    kv = core.stats().kv
    block = KVPool.block_bytes(base.geometry, base.dtype)
    held = kv.shared_prefix_blocks * block
    while core.has_work:
        core.step()
    return {
        "rows": kv.rows_sharing_prefixes,
        "prefix_tokens": spec.shared_prefix_tokens,
        "prefix_bytes_held": held,
        "one_copy_bytes": core.kv.pool.blocks_for(spec.shared_prefix_tokens) * block,
        "copy_per_row_bytes": spec.shared_rows * prefix.nbytes,
        "blocks_after": core.stats().kv.blocks_used,
    }


def measure_decode(base: BaseModel, spec: LongPromptSpec, repeats: int) -> dict[str, Any]:
    """Decode passes of ``decode_rows`` rows (prompts 16-64, prefixes of 4-32 tokens, 32 new tokens) in the
    paged layout and in the dense one (``PrefillBatch``: one transformers ``DynamicCache`` for the batch,
    every row padded to the longest prefix and prompt), each pass as the engine runs it and nothing else:
    the paged side builds its pass (block tables, groups, masks) from the rows, then both run the model,
    pick greedily and advance. The scheduling, sampling and detokenizing around a pass are the same for
    either layout, so they are left out of the ratio; the whole engine step (``core.step``, with them) is
    reported beside it. The two run in lockstep, so the machine's drift hits both alike: the medians of the
    passes and of their pass-by-pass ratios, over ``repeats`` rounds after a warm-up."""
    rng, vocab = random.Random(8), base.model.config.vocab_size
    prefixes = random_prefixes(base, [4, 8, 12, 16, 20, 24, 28, 32], seed=12)
    prompts = [[rng.randrange(5, vocab) for _ in range(rng.randint(16, 64))] for _ in range(spec.decode_rows)]
    core = EngineCore(base, SchedulerConfig(max_batch_size=spec.decode_rows, max_batch_tokens=1 << 16))
    runner = core.runner

    def prefilled_rows(name: str) -> list[EngineRequest]:
        for i, prompt in enumerate(prompts):
            core.add_request(
                GenerationRequest(
                    f"{name}{i}", prompt, prefixes[i % 8], SamplingParams(), 33, ignore_eos=True
                )
            )
        while any(r.prompt_left for r in core.rows) or core.scheduler.num_waiting:
            core.step()
        return core.rows

    def paged_passes() -> Iterator[float]:
        rows = prefilled_rows("p")
        tokens = [r.next_token for r in rows]
        for _ in range(32):
            started = time.perf_counter()
            batch = core.kv.batch([r.kv for r in rows], [[token] for token in tokens])
            picked = runner.forward(batch).argmax(-1)
            batch.advance()
            tokens = picked.tolist()
            yield time.perf_counter() - started
        for record in rows:
            core.abort(record.request_id)
        core.step()  # the aborted rows leave, their blocks go back

    def dense_passes() -> Iterator[float]:
        rows = [BatchRow(f"r{i}", prompt, prefixes[i % 8]) for i, prompt in enumerate(prompts)]
        batch = PrefillBatch.from_rows(rows, base.geometry, base.device, base.dtype)
        batch.advance(runner.forward(batch).argmax(-1))
        for _ in range(32):
            started = time.perf_counter()
            tokens = runner.forward(batch).argmax(-1)
            batch.advance(tokens)
            tokens.tolist()
            yield time.perf_counter() - started

    def engine_steps() -> Iterator[float]:
        prefilled_rows("s")
        while core.has_work:
            started = time.perf_counter()
            core.step()
            yield time.perf_counter() - started

    pairs: list[tuple[float, float]] = []
    steps: list[float] = []
    for round_ in range(repeats + 1):  # the first is a warm-up
        passes = list(zip(paged_passes(), dense_passes(), strict=True))
        engine = list(engine_steps())[:-1]  # the last step also retires the rows
        pairs += passes if round_ else []
        steps += engine if round_ else []
    return {
        "rows": spec.decode_rows,
        "paged_pass_ms": statistics.median(p for p, _ in pairs) * 1e3,
        "dense_pass_ms": statistics.median(d for _, d in pairs) * 1e3,
        "dense_over_paged": statistics.median(d / p for p, d in pairs),
        "engine_step_ms": statistics.median(steps) * 1e3,
    }


def measure_memory(settings: BenchSettings, spec: LongPromptSpec) -> dict[str, Any]:
    """One ``joining_tokens`` request in a fresh process (``_memory_child``)."""
    argv = [sys.executable, "-m", "server.benchmark.long_prompts", settings.geometry, settings.device]
    argv += [settings.dtype, str(spec.joining_tokens), str(spec.new_tokens), str(settings.threads)]
    done = subprocess.run(argv, capture_output=True, text=True, check=True, timeout=600)
    return json.loads(done.stdout.strip().splitlines()[-1])


def _memory_child(geometry: str, device: str, dtype: str, tokens: int, new_tokens: int, threads: int) -> None:
    torch.set_num_threads(threads)
    base = build_model(geometry, device=device, dtype=getattr(torch, dtype))
    config = SchedulerConfig()
    rng, vocab = random.Random(9), base.model.config.vocab_size
    core = EngineCore(base, config)

    def run(request: GenerationRequest) -> None:
        core.add_request(request)
        while core.has_work:
            core.step()

    run(_request("warm", 64, new_tokens, rng, vocab))  # thread pools and allocator warmed
    if base.device.type == "cuda":
        torch.cuda.reset_peak_memory_stats(base.device)
        before = torch.cuda.memory_allocated(base.device)
    else:
        Path("/proc/self/clear_refs").write_text("5")  # the peak (VmHWM) starts again from now (Linux)
        before = _status_bytes("VmRSS")
    run(_request("long", tokens, new_tokens, rng, vocab))
    if base.device.type == "cuda":
        growth = torch.cuda.max_memory_allocated(base.device) - before
    else:
        growth = _status_bytes("VmHWM") - before
    g = base.geometry
    itemsize = base.dtype.itemsize
    kv = KVPool.block_bytes(g, base.dtype) // BLOCK_SIZE * (tokens + new_tokens)
    model = base.model.config
    chunk, columns = config.prefill_chunk_tokens, tokens + new_tokens
    activations = (
        itemsize
        * (
            chunk * (4 * model.hidden_size + 3 * model.intermediate_size)  # hidden states, MLP
            + 2 * chunk * columns * model.num_attention_heads  # attention scores and their softmax
            + 2
            * 2
            * columns
            * model.num_attention_heads
            * g.head_dim  # gathered keys and values (GQA repeated)
            + chunk * columns  # the additive mask
        )
        + 4 * model.vocab_size
    )  # the float32 logits of the last position
    print(
        json.dumps(
            {
                "prompt_tokens": tokens,
                "new_tokens": new_tokens,
                "peak_growth_bytes": growth,
                "kv_bytes": kv,
                "activation_bytes": activations,
                "growth_over_kv_plus_activations": growth / (kv + activations),
                "measured_by": "cuda max_memory_allocated"
                if base.device.type == "cuda"
                else "peak RSS (VmHWM)",
            }
        )
    )


def _status_bytes(field: str) -> int:
    """A memory figure of this process from ``/proc/self/status`` (``VmRSS``, ``VmHWM``: its peak)."""
    for line in Path("/proc/self/status").read_text().splitlines():
        if line.startswith(f"{field}:"):
            return int(line.split()[1]) * 1024
    raise RuntimeError(f"/proc/self/status has no {field}")


def long_prompts(base: BaseModel, settings: BenchSettings, log: Log) -> dict[str, Any]:
    """Every part of the section (see the module's docstring), with the server's default chunking."""
    spec, config = settings.long_prompts, SchedulerConfig()
    log("long-prompts: 15 short + 1 long, together and apart")
    report: dict[str, Any] = {"spec": spec.__dict__, "mix": measure_mix(base, spec, settings.repeats, log)}
    log("long-prompts: a long prompt joins decoding rows")
    report["join"] = measure_join(base, spec, config)
    log("long-prompts: rows of one task")
    report["shared_prefix"] = measure_shared_prefix(base, spec)
    log("long-prompts: decode step at batch 16, engine and the dense layout")
    report["decode"] = measure_decode(base, spec, settings.repeats)
    log("long-prompts: one long request's peak memory, in a fresh process")
    report["memory"] = measure_memory(settings, spec)
    return report


if __name__ == "__main__":
    _memory_child(sys.argv[1], sys.argv[2], sys.argv[3], *map(int, sys.argv[4:7]))
