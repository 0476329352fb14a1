"""The serving layer: the one path from an API route to the engine and back, shared by the native and
OpenAI routes. A route plans its request (``plan.plan_request``: tokens, budgets, limits), then submits its
engine requests (one per prompt and sample) here, all or none, as one request to the tenant's limits, and
waits for the result (aborting if the client goes away); a request that did not finish raises
``RequestNotFinished``, which ``errors`` answers."""

from __future__ import annotations

import asyncio
import threading
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request

from server.api.errors import ApiError
from server.api.plan import RequestPlan
from server.api.state import AppState, Caller
from server.api.tenancy import TenantGate
from server.engine.async_engine import RequestStream
from server.engine.grammar import Grammar
from server.engine.request import GenerationRequest, GenerationResult, RequestNotFinished
from server.engine.sampling import SamplingParams

_DISCONNECT_POLL_S = 0.25


@dataclass(frozen=True)
class Row:
    """One engine request of a planned request: which of its prompts, and how it samples."""

    prompt: int  # an index into the plan's prompts
    sampling: SamplingParams
    logprobs: int | None = None  # each new token's logprob and this many alternatives; None: none


class _TenantSlot:
    """A request's one place in its tenant's limits, however many engine requests it makes: taken at once
    (429 over a limit), given back when the last of them leaves the engine (from any thread)."""

    def __init__(self, gate: TenantGate, tenant: str, rows: int) -> None:
        gate.admit(tenant)
        self._gate, self._tenant, self._left = gate, tenant, rows
        self._lock = threading.Lock()

    def rows_ended(self, count: int = 1) -> None:
        with self._lock:
            self._left -= count
            done = self._left == 0
        if done:
            self._gate.release(self._tenant)


async def submit(
    state: AppState,
    who: Caller,
    plan: RequestPlan,
    rows: Sequence[Row],
    *,
    ignore_eos: bool = False,
    id_prefix: str = "gen",
    prompt_logprobs: int | None = None,
    min_tokens: int = 0,
    stop_token_ids: tuple[int, ...] = (),
    grammar: Grammar | None = None,
) -> list[RequestStream]:
    """Queue ``rows`` of ``plan`` (loading and pinning the task's prefix), all or none: one request to the
    tenant's limits. Errors raise before any output, and end the rows already queued. ``ignore_eos``
    generates past EOS; the rest as ``GenerationRequest`` has them."""
    slot = _TenantSlot(state.gate, who.tenant, len(rows))
    on_output = state.metrics.observer(who.tenant) if state.metrics is not None else None
    deadline = time.monotonic() + state.settings.request_timeout_s
    streams: list[RequestStream] = []
    started = 0  # rows handed to the engine, which calls their on_done once each, also when it refuses one
    try:
        for row in rows:
            request = GenerationRequest(
                request_id=f"{id_prefix}-{uuid.uuid4().hex}",
                prompt_ids=plan.prompts[row.prompt],
                prefix=None,
                sampling=row.sampling,
                max_new_tokens=plan.max_new_tokens[row.prompt],
                stop_sequences=plan.stop,
                ignore_eos=ignore_eos,
                tenant=who.tenant,
                task_id=plan.task_id,
                deadline=deadline,
                logprobs=row.logprobs,
                prompt_logprobs=prompt_logprobs,
                min_tokens=min_tokens,
                stop_token_ids=stop_token_ids,
                grammar=grammar,
                cache_salt=plan.cache_salt,
            )
            started += 1
            shared = streams[0].request.request_id if streams else None  # one prefix version for them all
            streams.append(
                await state.engine.add_request(
                    request, on_done=slot.rows_ended, on_output=on_output, prefix_of=shared
                )
            )
    except BaseException:
        for stream in streams:
            stream.abort()
        if started < len(rows):
            slot.rows_ended(len(rows) - started)
        raise
    return streams


async def result_unless_disconnected(http_request: Request, stream: RequestStream) -> GenerationResult:
    """The finished result; aborts the engine request if the client disconnects first (499). A request
    that did not finish (shutdown, deadline, engine error) raises ``RequestNotFinished``, since a
    non-streaming client has no other way to learn of it."""
    collecting = asyncio.ensure_future(stream.result())
    try:
        while not collecting.done():
            await asyncio.wait({collecting}, timeout=_DISCONNECT_POLL_S)
            if not collecting.done() and await http_request.is_disconnected():
                stream.abort()
                raise ApiError(499, "client_closed", "the client closed the connection")
        result = collecting.result()
    finally:
        collecting.cancel()
    if not result.finish_reason.completed:
        raise RequestNotFinished(result.finish_reason)
    return result
