"""The serving layer: the one path from an API route to the engine and back, shared by the native and
OpenAI routes. A route plans its request (``plan.plan_request``: tokens, budgets, limits), then submits one
engine request per prompt and sample here (the tenant's gate, a deadline) and waits for the result
(aborting if the client goes away); a request that did not finish raises ``RequestNotFinished``, which
``errors`` answers."""

from __future__ import annotations

import asyncio
import time
import uuid

from fastapi import Request

from server.api.errors import ApiError
from server.api.plan import RequestPlan
from server.api.state import AppState, Caller
from server.engine.async_engine import RequestStream
from server.engine.grammar import Grammar
from server.engine.request import GenerationRequest, GenerationResult, RequestNotFinished
from server.engine.sampling import SamplingParams

_DISCONNECT_POLL_S = 0.25


async def submit(
    state: AppState,
    who: Caller,
    plan: RequestPlan,
    prompt: int = 0,
    *,
    sampling: SamplingParams,
    ignore_eos: bool = False,
    id_prefix: str = "gen",
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    min_tokens: int = 0,
    stop_token_ids: tuple[int, ...] = (),
    grammar: Grammar | None = None,
) -> RequestStream:
    """Queue the engine request of ``plan``'s prompt ``prompt`` (loading and pinning its prefix) within the
    tenant's limits. Errors raise before any output. ``ignore_eos`` generates past EOS; the rest as
    ``GenerationRequest`` has them."""
    request = GenerationRequest(
        request_id=f"{id_prefix}-{uuid.uuid4().hex}",
        prompt_ids=plan.prompts[prompt],
        prefix=None,
        sampling=sampling,
        max_new_tokens=plan.max_new_tokens[prompt],
        stop_sequences=plan.stop,
        ignore_eos=ignore_eos,
        tenant=who.tenant,
        task_id=plan.task_id,
        deadline=time.monotonic() + state.settings.request_timeout_s,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        min_tokens=min_tokens,
        stop_token_ids=stop_token_ids,
        grammar=grammar,
    )
    on_output = state.metrics.observer(who.tenant) if state.metrics is not None else None
    state.gate.admit(who.tenant)
    return await state.engine.add_request(
        request, on_done=lambda: state.gate.release(who.tenant), on_output=on_output
    )


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
