"""``prefix-serve bench --url``: the concurrency curve of a server that is already running, over HTTP.

Prompt lengths are in the server's tokens (``remote_prompts`` calibrates them; every response's usage
is checked); each point sends a fixed number of requests, for at least a minimum time; a 429 is
waited out as its ``Retry-After`` says, counted, and given up on past a wait budget.
"""

from __future__ import annotations

import asyncio
import email.utils
import itertools
import json
import random
import time
from collections import defaultdict
from collections.abc import Callable, Iterator, Sequence
from dataclasses import dataclass, field
from typing import Any

import httpx

from server.benchmark.remote_prompts import PromptBuilder, calibrate
from server.benchmark.served import ServerRefused
from server.benchmark.settings import BenchSettings
from server.benchmark.timeline import Timeline, summarize

Log = Callable[[str], None]


@dataclass(frozen=True)
class RemoteTarget:
    """The server to measure and how to treat it."""

    url: str
    api_key: str | None = None
    task_ids: tuple[str, ...] = ()  # empty: the caller's tasks (the base model if it has none)
    base_model: bool = False  # the base model (no prefix) in the mix; alone unless task_ids are given
    min_seconds: float = 0.0  # each point keeps sending until this long has passed, too
    max_retry_wait_s: float = 30.0  # most a request waits on 429s before it counts as refused


class RateLimited(ServerRefused):
    """Every request of a run was refused with 429 (its message quotes the server's)."""


@dataclass
class Answers:
    """What the server answered one run's requests, besides their tokens."""

    prompt_tokens: list[int] = field(default_factory=list)  # usage.prompt_tokens of each request
    rate_limited: int = 0  # 429 answers (each waited out as Retry-After said, or given up on)
    refused: int = 0  # requests given up on: their next Retry-After was past the wait budget
    last_refusal: str = ""  # the server's message of the last 429, with its Retry-After

    def add(self, other: Answers) -> None:
        self.prompt_tokens += other.prompt_tokens
        self.rate_limited += other.rate_limited
        self.refused += other.refused
        self.last_refusal = other.last_refusal or self.last_refusal


class GenerateCalls:
    """Streaming ``POST /v1/generate`` that waits out 429s and reads each request's usage."""

    def __init__(self, client: httpx.AsyncClient, max_retry_wait_s: float) -> None:
        self.client, self.max_retry_wait_s = client, max_retry_wait_s
        self._ids = itertools.count()

    async def send(self, body: dict, timeline: Timeline, answers: Answers) -> bool:
        """One request, recorded on ``timeline`` from its first attempt; False if given up on 429s."""
        request_id, waited = f"h{next(self._ids)}", 0.0
        timeline.submitted[request_id] = time.perf_counter()
        while True:
            async with self.client.stream("POST", "/v1/generate", json={**body, "stream": True}) as response:
                if response.status_code == 200:
                    answers.prompt_tokens.append(await _stream(response, request_id, timeline))
                    return True
                await response.aread()
                if response.status_code != 429:
                    raise ServerRefused(f"POST /v1/generate answered {response.status_code}: {response.text}")
            answers.rate_limited += 1
            wait = _retry_after_s(response)
            answers.last_refusal = f"429 {_message(response)} (Retry-After {wait:g} s)"
            if waited + wait > self.max_retry_wait_s:
                answers.refused += 1
                del timeline.submitted[request_id]
                return False
            await asyncio.sleep(wait)
            waited += wait

    async def prompt_tokens(self, prompt: str, answers: Answers) -> int:
        """The server's token count of ``prompt`` (a one-token request on the base model)."""
        if not await self.send({"prompt": prompt, "max_new_tokens": 1}, Timeline(), answers):
            raise RateLimited(self.refusal("a calibration request", answers))
        return answers.prompt_tokens.pop()

    def refusal(self, what: str, answers: Answers) -> str:
        """Why ``what`` was given up on: the server's last 429, and the wait budget."""
        return (
            f"{what} was refused: {answers.last_refusal}; "
            f"that is past the --max-retry-wait of {self.max_retry_wait_s:g} s"
        )


async def _stream(response: httpx.Response, request_id: str, timeline: Timeline) -> int:
    """Count the token events of one SSE response; its prompt tokens from the final event's usage."""
    prompt_tokens = 0
    async for line in response.aiter_lines():
        if line.startswith('data: {"token_id"'):
            timeline.record([(request_id, 1, False)])
        elif line.startswith("data: {"):
            prompt_tokens = json.loads(line[6:]).get("usage", {}).get("prompt_tokens", 0)
    timeline.record([(request_id, 0, True)])
    return prompt_tokens


def _retry_after_s(response: httpx.Response) -> float:
    """``Retry-After`` in seconds (a number or an HTTP date); 1 when missing or unreadable."""
    value = response.headers.get("Retry-After", "")
    try:
        return max(0.0, float(value))
    except ValueError:
        pass
    try:
        return max(0.0, email.utils.parsedate_to_datetime(value).timestamp() - time.time())
    except (TypeError, ValueError):
        return 1.0


def _message(response: httpx.Response) -> str:
    try:
        return str(response.json()["error"]["message"])
    except (ValueError, KeyError, TypeError):
        return response.text.strip()[:200]


def _bodies(
    settings: BenchSettings, prompts: PromptBuilder, tasks: Sequence[str | None], seed: int
) -> Iterator[dict]:
    """Endless request bodies: tasks round-robin, prompt and output lengths uniform in their ranges."""
    rng = random.Random(seed)
    for task in itertools.cycle(tasks):
        yield {
            "task_id": task,
            "prompt": prompts.prompt(rng.randint(*settings.workload.prompt_tokens), rng),
            "max_new_tokens": rng.randint(*settings.workload.new_tokens),
        }


async def closed_loop(
    calls: GenerateCalls, bodies: Iterator[dict], clients: int, *, requests: int, min_seconds: float = 0.0
) -> tuple[Timeline, Answers]:
    """``clients`` clients, each sending its next request when its last one ended, until ``requests``
    were sent and ``min_seconds`` have passed."""
    timeline, answers, sent = Timeline(), Answers(), 0
    timeline.started = time.perf_counter()

    async def client() -> None:
        nonlocal sent
        while sent < requests or time.perf_counter() - timeline.started < min_seconds:
            sent += 1
            await calls.send(next(bodies), timeline, answers)

    await asyncio.gather(*(client() for _ in range(clients)))
    timeline.ended = time.perf_counter()
    return timeline, answers


def requests_per_point(settings: BenchSettings, clients: int) -> int:
    """``--requests``, or one per client where that is more."""
    return max(settings.workload.requests, clients)


async def _targets(client: httpx.AsyncClient, target: RemoteTarget, tasks: int) -> list[str | None]:
    """The tasks the requests go to (None: the base model)."""
    if target.task_ids or target.base_model:
        return [*target.task_ids, *([None] if target.base_model else [])]
    models = await client.get("/v1/models")  # the caller's tasks: cards with a parent
    if models.status_code != 200:
        raise ServerRefused(f"GET /v1/models answered {models.status_code}: {models.text}")
    mine = sorted(card["id"] for card in models.json()["data"] if card.get("parent"))[:tasks]
    return list(mine) or [None]


def measure_server(target: RemoteTarget, settings: BenchSettings, log: Log) -> dict[str, Any]:
    """The report's remote parts: the concurrency curve, the tasks, the calibration and the refusals."""
    return asyncio.run(_measure(target, settings, log))


async def _measure(target: RemoteTarget, settings: BenchSettings, log: Log) -> dict[str, Any]:
    headers = {"Authorization": f"Bearer {target.api_key}"} if target.api_key else {}
    async with httpx.AsyncClient(base_url=target.url, timeout=600, headers=headers) as client:
        tasks = await _targets(client, target, settings.tasks)
        calls, setup = GenerateCalls(client, target.max_retry_wait_s), Answers()
        prompts = await calibrate(lambda prompt: calls.prompt_tokens(prompt, setup))
        _log_calibration(log, prompts, settings.workload.prompt_tokens)
        warm_up, warm_answers = await closed_loop(
            calls, _bodies(settings, prompts, tasks, seed=0), 2, requests=max(2, len(tasks))
        )
        _check_some_answered(calls, warm_up, warm_answers, "the warm-up")
        setup.add(warm_answers)
        points, answered = await _curve(calls, prompts, tasks, target, settings, log)
    measured = [n for answers in answered for n in answers.prompt_tokens]
    totals = Answers()
    for answers in (setup, *answered):
        totals.add(answers)
    _log_outcome(log, settings.workload.prompt_tokens, measured, totals)
    return {
        "tasks": [t for t in tasks if t is not None],
        "base_model": None in tasks,
        "calibration": prompts.to_json(),
        "warm_up_requests": len(warm_up.finished),
        "prompt_tokens": {
            "requested": list(settings.workload.prompt_tokens),
            "measured": [min(measured), max(measured)],
        },
        "rate_limited": totals.rate_limited,
        "refused": totals.refused,
        "curves": {"concurrency": points},
    }


async def _curve(
    calls: GenerateCalls,
    prompts: PromptBuilder,
    tasks: Sequence[str | None],
    target: RemoteTarget,
    settings: BenchSettings,
    log: Log,
) -> tuple[list[dict[str, Any]], list[Answers]]:
    """The concurrency curve's points (median of the repeats, points interleaved), and what the
    server answered each point's requests over all repeats."""
    repeated: dict[int, list[Timeline]] = defaultdict(list)
    answered: dict[int, Answers] = defaultdict(Answers)
    for repeat in range(settings.repeats):
        for clients in settings.concurrency_curve:
            timeline, answers = await closed_loop(
                calls,
                _bodies(settings, prompts, tasks, seed=clients),
                clients,
                requests=requests_per_point(settings, clients),
                min_seconds=target.min_seconds,
            )
            _check_some_answered(calls, timeline, answers, f"the {clients}-client run")
            repeated[clients].append(timeline)
            answered[clients].add(answers)
            log(
                f"remote {repeat + 1}/{settings.repeats}: {clients} clients, {len(timeline.finished)} "
                f"requests -> {timeline.tokens_per_s:.1f} tok/s"
                + (f", {answers.rate_limited} answered 429" if answers.rate_limited else "")
            )
    points = [{"x": c, **summarize(runs), **_answers_json(answered[c])} for c, runs in repeated.items()]
    return points, list(answered.values())


def _check_some_answered(calls: GenerateCalls, timeline: Timeline, answers: Answers, what: str) -> None:
    if not timeline.finished:
        raise RateLimited(calls.refusal(f"every request of {what}", answers))


def _answers_json(answers: Answers) -> dict[str, Any]:
    tokens = answers.prompt_tokens
    return {
        "prompt_tokens_min": min(tokens),
        "prompt_tokens_max": max(tokens),
        "prompt_tokens_mean": sum(tokens) / len(tokens),
        "rate_limited": answers.rate_limited,
        "refused": answers.refused,
    }


def _log_calibration(log: Log, prompts: PromptBuilder, requested: tuple[int, int]) -> None:
    log(
        f"calibrated on {prompts.probes} requests: {prompts.offset} tokens added per prompt, "
        f"words {prompts.word_tokens}"
    )
    if not prompts.additive:
        log("[yellow]the server does not count these words one by one: prompt lengths are approximate")
    if requested[0] < prompts.shortest:
        log(
            f"[yellow]the shortest prompt this server counts is {prompts.shortest} tokens, over {requested[0]}"
        )


def _log_outcome(log: Log, requested: tuple[int, int], measured: list[int], totals: Answers) -> None:
    low, high = requested
    lowest, highest = min(measured), max(measured)
    style = "" if low <= lowest and highest <= high else "[yellow]"
    log(
        f"{style}prompt tokens, as the server counted them: {lowest}-{highest} "
        f"(mean {sum(measured) / len(measured):.1f}, requested {low}-{high})"
    )
    if totals.rate_limited:
        log(
            f"[yellow]the server answered 429 {totals.rate_limited} times; {totals.refused} requests were "
            f"given up on; throughput and latency include the waits. Last: {totals.last_refusal}"
        )
