"""The serving layer: the one path from an API request to the engine and back, shared by the native and
OpenAI routes. It decides a request's ``max_new_tokens`` against the server's limit, tells what a request
takes of the model's context, checks the other limits, builds and submits the engine request, waits for
the result (aborting if the client goes away), and maps a request that did not finish to its HTTP error —
the same for every route."""

from __future__ import annotations

import asyncio
import time
import uuid
from collections.abc import Sequence
from dataclasses import dataclass

from fastapi import Request

from prefix_store.errors import StoreUnavailable
from prefix_store.storage.names import validate_task_id
from server.api.errors import ApiError
from server.api.state import AppState, Caller
from server.engine.async_engine import RequestStream
from server.engine.grammar import Grammar
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationRequest, GenerationResult, RequestTooLong
from server.engine.sampling import SamplingParams
from server.engine.scheduler import RequestTooLarge

_DISCONNECT_POLL_S = 0.25


# how a request that ended without finishing is answered, as (status, type, message); a stream that has
# started cannot change its status and reports the same type and message in its last event
UNFINISHED: dict[FinishReason, tuple[int, str, str]] = {
    FinishReason.ABORTED: (503, "unavailable", "the request was aborted (the server is shutting down)"),
    FinishReason.DEADLINE: (504, "deadline_exceeded", "the request did not finish within its time limit"),
    FinishReason.ERROR: (500, "internal_error", "the engine failed while generating; see the server log"),
}


def max_new_tokens(state: AppState, value: int, *, explicit: bool, field: str) -> int:
    """The request's ``max_new_tokens``: ``value`` when the caller set it (``field``, the name the caller
    used, over the server's ``--max-new-tokens``: 422), else the route's default ``value`` cut to that limit
    (a server run with ``--max-new-tokens 8`` must not refuse a request that set nothing). Without the
    option the model's context is the limit, which the engine checks with the prefix's length known."""
    limit = state.settings.max_new_tokens
    if limit is None:
        return value
    if not explicit:
        return min(value, limit)
    if value > limit:
        raise ApiError(
            422,
            "validation_error",
            f"{field} is over the limit of {limit}",
            param=field,
            code="integer_above_max_value",
        )
    return value


@dataclass(frozen=True)
class ContextUse:
    """What prefix + prompt take of the model's context (its positions), and the room they leave."""

    context: int | None  # the model's positions; None = no limit
    prefix: int  # the task's virtual tokens (0 where the store could not tell: the engine checks again)
    prompt: int  # prompt tokens

    @property
    def room(self) -> int | None:
        """How many new tokens fit after prefix + prompt (< 1: the prompt alone is too long)."""
        return None if self.context is None else self.context - self.prefix - self.prompt


async def context_use(
    state: AppState, who: Caller, task_id: str | None, prompt_tokens: int, *, new_tokens: int
) -> ContextUse:
    """What prefix + prompt take of the context. The prefix's length is read from the store only where it
    could matter: where ``new_tokens`` after the prompt and the longest prefix the server takes would not
    fit. Raises ``PrefixNotFound`` for an unknown task."""
    context, prefix = state.base.max_positions, 0
    longest = prompt_tokens + new_tokens + state.settings.max_virtual_tokens
    if task_id is not None and context is not None and longest > context:
        try:
            record = await asyncio.to_thread(state.store.head, who.tenant, task_id)
            prefix = record.num_virtual_tokens
        except StoreUnavailable:
            pass  # a resident prefix may still serve; if it does not fit, the engine says so
    return ContextUse(context, prefix, prompt_tokens)


def check_stop_sequences(state: AppState, stop: Sequence[str]) -> None:
    """Server-wide limits on the stop sequences (the schema bounds the rest of the request)."""
    settings = state.settings
    if len(stop) > settings.max_stop_sequences or any(
        not s or len(s) > settings.max_stop_sequence_chars for s in stop
    ):
        raise ApiError(
            422,
            "validation_error",
            f"stop takes at most {settings.max_stop_sequences} non-empty sequences of at most "
            f"{settings.max_stop_sequence_chars} characters",
            param="stop",
            code="invalid_value",
        )


def tokenize(state: AppState, prompt: str, *, add_special_tokens: bool = True) -> list[int]:
    """The prompt's token ids (400 for none), without the server's limit on them. A chat template's output
    already holds its special tokens: tokenize it with ``add_special_tokens=False`` (else BOS comes twice)."""
    prompt_ids = state.base.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
    if not prompt_ids:
        raise ApiError(400, "invalid_request", "the prompt encodes to no tokens")
    return prompt_ids


def tokenize_prompt(state: AppState, prompt: str) -> list[int]:
    """The prompt's token ids, within the server's limit (413 over it)."""
    prompt_ids = tokenize(state, prompt)
    if len(prompt_ids) > state.settings.max_prompt_tokens:
        raise ApiError(
            413,
            "payload_too_large",
            f"the prompt has {len(prompt_ids)} tokens, over the limit of {state.settings.max_prompt_tokens}",
        )
    return prompt_ids


async def submit(
    state: AppState,
    who: Caller,
    *,
    prompt_ids: list[int],
    task_id: str | None,
    sampling: SamplingParams,
    max_new_tokens: int,
    stop: Sequence[str],
    ignore_eos: bool = False,
    id_prefix: str = "gen",
    logprobs: int | None = None,
    prompt_logprobs: int | None = None,
    min_tokens: int = 0,
    stop_token_ids: tuple[int, ...] = (),
    grammar: Grammar | None = None,
) -> RequestStream:
    """Check limits, then queue the request (loading and pinning its prefix). Errors raise before any output.
    ``max_new_tokens`` is already decided (``max_new_tokens()``); ``ignore_eos`` generates past EOS; the
    rest as ``GenerationRequest`` has them. A request the engine refuses as malformed is a 400."""
    check_stop_sequences(state, stop)
    if task_id is not None:
        validate_task_id(task_id)  # a name, never a path: refused (400) before any admission or I/O
    request = GenerationRequest(
        request_id=f"{id_prefix}-{uuid.uuid4().hex}",
        prompt_ids=prompt_ids,
        prefix=None,
        sampling=sampling,
        max_new_tokens=max_new_tokens,
        stop_sequences=tuple(stop),
        ignore_eos=ignore_eos,
        tenant=who.tenant,
        task_id=task_id,
        deadline=time.monotonic() + state.settings.request_timeout_s,
        logprobs=logprobs,
        prompt_logprobs=prompt_logprobs,
        min_tokens=min_tokens,
        stop_token_ids=stop_token_ids,
        grammar=grammar,
    )
    on_output = state.metrics.observer(who.tenant) if state.metrics is not None else None
    state.gate.admit(who.tenant)
    try:
        return await state.engine.add_request(
            request, on_done=lambda: state.gate.release(who.tenant), on_output=on_output
        )
    except (RequestTooLong, RequestTooLarge):
        raise
    except ValueError as exc:  # e.g. min_tokens over max_tokens, a token id outside the vocabulary
        raise ApiError(400, "invalid_request", str(exc), code="invalid_value") from None


async def result_unless_disconnected(http_request: Request, stream: RequestStream) -> GenerationResult:
    """The finished result; aborts the engine request if the client disconnects first (499). A request
    that did not finish (shutdown, deadline, engine error) raises its ``UNFINISHED`` error, since a
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
    if result.finish_reason in UNFINISHED:
        raise ApiError(*UNFINISHED[result.finish_reason])
    return result
