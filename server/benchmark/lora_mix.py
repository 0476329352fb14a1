"""LoRA tasks in the same batches as everything else (the ``lora`` section), every ratio from one run:

base          the clients' requests, every row on the base model
lora-half     the same requests, every other row on one of four LoRA tasks (rank 16 on q/k/v/o)
prefix-half   the same requests, every other row on one of four prefix tasks (16 virtual tokens)

Runs are interleaved and repeated (drift in machine speed hits every system alike); ratios are paired run
by run. The section also says what one LoRA task and one prefix take in memory on this model.
"""

from __future__ import annotations

from collections import defaultdict
from dataclasses import replace
from typing import Any

import torch

from prefix_store.lora import LoraAdapter, LoraModule
from server.benchmark.baselines import Log
from server.benchmark.loops import EngineSystem, closed_loop
from server.benchmark.models import random_prefixes
from server.benchmark.settings import BenchSettings
from server.benchmark.timeline import Timeline, paired_ratio, summarize
from server.benchmark.workload import engine_requests, sample_shapes
from server.engine.base_model import BaseModel

TASKS = 4
RANK = 16
PREFIX_TOKENS = 16
TARGETS = ("q_proj", "k_proj", "v_proj", "o_proj")


def random_loras(base: BaseModel, count: int, *, rank: int, seed: int) -> list[LoraAdapter]:
    """``count`` LoRA tasks of ``rank`` on the attention projections of every layer, in the model's dtype and
    on its device (values small enough to keep the model's numbers in range)."""
    generator = torch.Generator().manual_seed(seed)
    projections = [p for p in base.geometry.projections if p.name.rsplit(".", 1)[-1] in TARGETS]
    loras = []
    for _ in range(count):
        modules = {
            p.name: LoraModule(
                (torch.randn(rank, p.in_features, generator=generator) * 0.02).to(base.device, base.dtype),
                (torch.randn(p.out_features, rank, generator=generator) * 0.02).to(base.device, base.dtype),
                alpha=2.0 * rank,
            )
            for p in projections
        }
        loras.append(LoraAdapter(modules))
    return loras


def lora_mix(base: BaseModel, settings: BenchSettings, log: Log) -> dict[str, Any]:
    """Each system's ``summarize`` (median of ``settings.repeats`` interleaved runs), the paired ratios, and
    the bytes of one LoRA task and one prefix."""
    names = [f"t{i}" for i in range(TASKS)]
    loras = dict(zip(names, random_loras(base, TASKS, rank=RANK, seed=21), strict=True))
    prefixes = dict(zip(names, random_prefixes(base, [PREFIX_TOKENS] * TASKS, seed=22), strict=True))
    order: list[str | None] = [task for name in names for task in (None, name)]  # every other row on a task
    shapes = sample_shapes(settings.workload, order)
    on_prefixes = engine_requests(shapes, prefixes, vocab_size=base.model.config.vocab_size)
    requests = {
        "base": [replace(r, prefix=None, task_id=None) for r in on_prefixes],
        "lora-half": [
            replace(r, prefix=None, lora=loras[r.task_id] if r.task_id else None) for r in on_prefixes
        ],
        "prefix-half": on_prefixes,
    }
    concurrency = settings.concurrency

    def run(name: str) -> Timeline:
        return closed_loop(EngineSystem(base, max_batch_size=concurrency), requests[name], concurrency)

    run("lora-half")  # warm-up
    repeated: dict[str, list[Timeline]] = defaultdict(list)
    for repeat in range(settings.repeats):
        for name in requests:
            repeated[name].append(run(name))
            log(f"lora {repeat + 1}/{settings.repeats}: {name} {repeated[name][-1].tokens_per_s:.1f} tok/s")
    systems = {name: summarize(timelines) for name, timelines in repeated.items()}
    per_second = {name: summary["runs_tokens_per_s"] for name, summary in systems.items()}
    return {
        "systems": systems,
        "clients": concurrency,
        "tasks": TASKS,
        "rank": RANK,
        "prefix_tokens": PREFIX_TOKENS,
        "lora_over_base": paired_ratio(per_second["lora-half"], per_second["base"]),
        "lora_over_prefix": paired_ratio(per_second["lora-half"], per_second["prefix-half"]),
        "lora_bytes": next(iter(loras.values())).nbytes,
        "prefix_bytes": next(iter(prefixes.values())).nbytes,
    }
