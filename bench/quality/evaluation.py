"""Generation for the test set through a running server: every system's requests sent at once.

A system is a task on the server (a trained prefix), the server's model with no task (a fine-tuned model
folder), or the base model prompted through the chat endpoint with an instruction and a few solved
examples. All requests of all systems on one server go out together (at most ``in_flight`` open at a
time), so the server batches rows of different tasks with each other: the evaluation is the serving path
a user would take, not a separate generation loop. Decoding is greedy; an output is its first line.
"""

from __future__ import annotations

import asyncio
import time
from collections.abc import Sequence
from dataclasses import dataclass
from typing import Any

import httpx

from bench.quality.e2e_data import Example


@dataclass(frozen=True)
class System:
    name: str  # the report's key: method/setting
    task_id: str | None = None  # the prefix to condition on; None: the server's model as it is
    chat: list[dict[str, str]] | None = None  # set: prompted through chat with these messages first


@dataclass(frozen=True)
class Outputs:
    texts: dict[str, list[str]]  # system name -> one output per test example, in order
    seconds: float  # wall time of the whole evaluation on this server
    requests: int


def first_line(text: str) -> str:
    lines = [line.strip() for line in text.strip().splitlines() if line.strip()]
    return lines[0] if lines else ""


async def _generate(
    client: httpx.AsyncClient, system: System, example: Example, base_id: str, max_new_tokens: int
) -> str:
    if system.chat is not None:
        messages = [*system.chat, {"role": "user", "content": example.mr_text}]
        body: dict[str, Any] = {"model": base_id, "messages": messages, "max_tokens": max_new_tokens}
        response = await client.post("/v1/chat/completions", json={**body, "temperature": 0})
        response.raise_for_status()
        return first_line(response.json()["choices"][0]["message"]["content"])
    body = {"task_id": system.task_id, "prompt": example.prompt, "max_new_tokens": max_new_tokens}
    response = await client.post("/v1/generate", json={**body, "temperature": 0})
    response.raise_for_status()
    return first_line(response.json()["text"])


async def _evaluate(
    url: str, systems: Sequence[System], test: Sequence[Example], max_new_tokens: int, in_flight: int
) -> Outputs:
    gate = asyncio.Semaphore(in_flight)
    async with httpx.AsyncClient(base_url=url, timeout=600) as client:
        base_id = (await client.get("/v1/models")).json()["data"][0]["id"]

        async def one(system: System, example: Example) -> str:
            async with gate:
                return await _generate(client, system, example, base_id, max_new_tokens)

        started = time.perf_counter()
        # interleaved, so that every batch the server forms mixes systems
        jobs = [(system, example) for example in test for system in systems]
        texts = await asyncio.gather(*(one(system, example) for system, example in jobs))
        seconds = time.perf_counter() - started
    by_system: dict[str, list[str]] = {system.name: [] for system in systems}
    for (system, _), text in zip(jobs, texts, strict=True):
        by_system[system.name].append(text)
    return Outputs(by_system, seconds, len(jobs))


def evaluate(
    url: str,
    systems: Sequence[System],
    test: Sequence[Example],
    *,
    max_new_tokens: int = 64,
    in_flight: int = 128,
) -> Outputs:
    """Every system's output for every test example, from the server at ``url``."""
    return asyncio.run(_evaluate(url, systems, test, max_new_tokens, in_flight))
