"""The server over HTTP against the same stack in process: same model, store and workload, same run
(a server that is already running is measured by ``remote``)."""

from __future__ import annotations

import asyncio
import json
from collections import defaultdict
from collections.abc import Sequence
from dataclasses import replace
from pathlib import Path

import httpx

from server.benchmark.baselines import Log, mix_lengths
from server.benchmark.models import random_tasks
from server.benchmark.served import (
    InProcessServer,
    closed_loop,
    http_sender,
    save_model,
    upload,
)
from server.benchmark.settings import BenchSettings
from server.benchmark.timeline import Timeline, paired_ratio, summarize
from server.benchmark.workload import WORDS, http_bodies, sample_shapes, single_token_words
from server.engine.base_model import BaseModel
from server.engine.config import DEFAULT_TENANT
from testing.server_process import ServerProcess


def _bodies(
    settings: BenchSettings, tasks: Sequence[str | None], clients: int, words: Sequence[str] = WORDS
) -> list[dict]:
    spec = replace(settings.workload.for_clients(clients), seed=clients)
    return http_bodies(sample_shapes(spec, tasks), words)


def http_vs_in_process(base: BaseModel, settings: BenchSettings, workdir: Path, log: Log) -> list[dict]:
    """Per client count: HTTP and in-process summaries and their throughput ratio."""
    prefixes = random_tasks(base, mix_lengths(settings.tasks), seed=23)
    tasks = list(prefixes)
    store_url = (workdir / "http-store").as_uri()
    upload(store_url, base, prefixes)
    most = max(settings.http_concurrency)
    preload = json.dumps([f"{DEFAULT_TENANT}/{task}" for task in tasks])
    env = {"PREFIX_SERVE_MAX_BATCH_SIZE": str(most), "PREFIX_SERVE_PRELOAD": preload}
    with ServerProcess(save_model(base, workdir / "model"), store_url, env=env, ready_s=300) as server:
        runs = asyncio.run(_compare(base, settings, tasks, store_url, server.url, log))
    return [
        {
            "clients": clients,
            "http": summarize(runs["http", clients]),
            "in_process": summarize(runs["in-process", clients]),
            "http_over_in_process": paired_ratio(
                [t.tokens_per_s for t in runs["http", clients]],
                [t.tokens_per_s for t in runs["in-process", clients]],
            ),
        }
        for clients in settings.http_concurrency
    ]


async def _compare(
    base: BaseModel, settings: BenchSettings, tasks: list[str], store_url: str, url: str, log: Log
) -> dict[tuple[str, int], list[Timeline]]:
    runs: dict[tuple[str, int], list[Timeline]] = defaultdict(list)
    most = max(settings.http_concurrency)
    async with (
        httpx.AsyncClient(base_url=url, timeout=600) as client,
        InProcessServer(base, store_url, max_batch_size=most, preload=tasks) as in_process,
    ):
        send_http = http_sender(client)
        words = single_token_words(base.tokenizer)
        warm_up = _bodies(settings, tasks, 1, words)[: len(tasks)]
        await closed_loop(send_http, warm_up, len(tasks))
        await closed_loop(in_process.send, warm_up, len(tasks))
        for repeat in range(settings.repeats):
            for clients in settings.http_concurrency:  # the two sides alternate: drift hits both
                bodies = _bodies(settings, tasks, clients, words)
                runs["http", clients].append(await closed_loop(send_http, bodies, clients))
                runs["in-process", clients].append(await closed_loop(in_process.send, bodies, clients))
                log(
                    f"http {repeat + 1}/{settings.repeats}: {clients} clients -> "
                    f"{runs['http', clients][-1].tokens_per_s:.1f} / {runs['in-process', clients][-1].tokens_per_s:.1f} tok/s"
                )
    return runs
