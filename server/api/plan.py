"""The request plan: what the serving layer decides of a generation request, once, for every route.

Each route turns its body into prompts (texts, or token ids) and the new-token budget as the caller gave
it; ``plan_request`` decides the rest here and nowhere else, in this order: the task id is a name; each
prompt's tokens (texts tokenised here; token ids, stop token ids and ``logit_bias`` keys inside the
vocabulary; at most ``max_prompt_tokens``); the stop sequences within the server's limits; each prompt's
``max_new_tokens``; and the work of the whole request (its engine requests, one per prompt and sample, and
their tokens and logprob entries). A budget asked for must be within the server's cap
(``NewTokensOverLimit``), and prefix + prompt + it must fit the model's positions
(``ContextLengthExceeded``), the batch's token budget (``RequestTooLarge``) and the request's token limit;
unset, it is the route's default cut to all of them (an error only where the prompt leaves no room at
all). The prefix's length is read from the store only where it could change the answer.

The engine trusts the plan; its own ``check_fits`` stays as the invariant that also catches a task
replaced by a longer prefix between the plan and the pin. The exceptions here carry facts; ``errors``
turns them into each route family's answer.
"""

from __future__ import annotations

import asyncio
from collections.abc import Mapping, Sequence
from dataclasses import dataclass

from prefix_store.errors import StoreUnavailable
from prefix_store.storage.excerpt import excerpt_int
from prefix_store.storage.names import validate_task_id
from server.api.errors import ApiError
from server.api.refusals import ContextLengthExceeded, NewTokensOverLimit, PromptTooLong
from server.api.state import AppState, Caller
from server.engine.request import PROMPT_LOGPROBS_OF_A_SOURCE, context_room
from server.engine.scheduler import RequestTooLarge

# an unset budget that means "as many as fit" where the server sets no --max-new-tokens: a row reserves
# its max_new_tokens in the batch, so the whole context for each would cut how many requests run at once
AS_MANY_AS_FIT_TOKENS = 1024


@dataclass(frozen=True)
class NewTokens:
    """What a request says of its new tokens."""

    asked: int | None  # as the caller set it; None: unset
    field: str  # the request field that sets it: max_new_tokens, max_tokens or max_completion_tokens
    default: int | None  # unset: this many, cut to what fits; None: as many as fit, up to the server's cap


@dataclass(frozen=True)
class Fanout:
    """What a request makes of each prompt, which sizes its work and its answer."""

    samples: int = 1  # engine requests per prompt (n, or best_of)
    choices: int = 1  # of which the answer holds (n)
    logprobs: int | None = None  # alternatives given with each new token's logprob; None: no logprobs
    prompt_logprobs: int | None = None  # the same for the prompt's tokens (echo); None: none


@dataclass(frozen=True)
class RequestPlan:
    """A generation request as the serving layer decided it: what the engine requests are made of."""

    task_id: str | None  # a valid name in the caller's tenant; None: the base model
    prompts: list[list[int]]  # each prompt's token ids
    max_new_tokens: list[int]  # each prompt's new-token budget
    stop: tuple[str, ...]  # stop sequences, within the server's limits
    cache_salt: str | None = None  # only rows of the same salt share cached prompt blocks

    @property
    def prompt_tokens(self) -> int:
        return sum(len(prompt) for prompt in self.prompts)


async def plan_request(
    state: AppState,
    who: Caller,
    *,
    task_id: str | None,
    prompts: Sequence[str | list[int]],
    new_tokens: NewTokens,
    prompt_field: str = "prompt",
    add_special_tokens: bool = True,
    stop: Sequence[str] = (),
    min_tokens: int = 0,
    token_ids: Mapping[str, Sequence[int]] | None = None,
    fanout: Fanout = Fanout(),
    cache_salt: str | None = None,
) -> RequestPlan:
    """Decide ``prompts`` (texts tokenised with ``add_special_tokens``, or token ids) for ``task_id``.
    ``token_ids`` are the request's other token ids by field (stop token ids, ``logit_bias`` keys);
    ``fanout`` what it makes of each prompt. Raises the exceptions above, ``RequestTooLarge``,
    ``ApiError`` (400) for a value no model could serve or work over the request's limits, and the
    store's ``PrefixNotFound`` where it looked the task up."""
    if task_id is not None:
        validate_task_id(task_id)  # a name, never a path: refused before any I/O
    if fanout.prompt_logprobs is not None and state.base.encoder_decoder is not None:
        raise ApiError(
            400, "invalid_request", PROMPT_LOGPROBS_OF_A_SOURCE, param="echo", code="invalid_value"
        )
    _check_stop_sequences(state, stop)
    token_lists = [_tokens(state, prompt, add_special_tokens) for prompt in prompts]
    _check_vocabulary(state, {prompt_field: [t for ids in token_lists for t in ids], **(token_ids or {})})
    longest = max(len(ids) for ids in token_lists)
    if longest > state.settings.max_prompt_tokens:
        raise PromptTooLong(
            longest,
            state.settings.max_prompt_tokens,
            context=state.base.max_positions,
            prompt_field=prompt_field,
        )
    cap = state.settings.max_new_tokens
    if new_tokens.asked is not None and cap is not None and new_tokens.asked > cap:
        raise NewTokensOverLimit(new_tokens.field, cap)
    wanted = new_tokens.asked
    if wanted is None:
        wanted = min(new_tokens.default or cap or AS_MANY_AS_FIT_TOKENS, cap or AS_MANY_AS_FIT_TOKENS)
    prefix = await _prefix_tokens(state, who, task_id, longest, wanted)
    decided = [_new_tokens(state, prefix, len(ids), wanted, new_tokens, prompt_field) for ids in token_lists]
    decided = _within_request_limits(state, token_lists, decided, new_tokens, fanout)
    if min_tokens > min(decided):
        raise ApiError(
            400,
            "invalid_request",
            f"min_tokens ({excerpt_int(min_tokens)}) is over {new_tokens.field} ({min(decided)})",
            param="min_tokens",
            code="invalid_value",
        )
    return RequestPlan(task_id, token_lists, decided, tuple(stop), cache_salt)


def _within_request_limits(
    state: AppState, prompts: list[list[int]], decided: list[int], new_tokens: NewTokens, fanout: Fanout
) -> list[int]:
    """What one request may make the server compute and return: engine requests the queue can hold,
    prompt + new tokens over them (``max_request_tokens``: an unset budget is cut to fit), logprob entries in
    the answer (``max_request_logprobs``). Over a limit: a 400 that states it."""
    settings = state.settings
    rows = len(prompts) * fanout.samples
    if rows > settings.max_queue:
        raise ApiError(
            400,
            "invalid_request",
            f"this request makes {rows} engine requests (prompts × n or best_of), more than the "
            f"{settings.max_queue} the server queues",
            param="n",
            code="invalid_value",
        )
    prompt_tokens = sum(len(prompt) for prompt in prompts) * fanout.samples
    if new_tokens.asked is None:  # what the request's token limit leaves each engine request
        decided = [min(budget, (settings.max_request_tokens - prompt_tokens) // rows) for budget in decided]
    total = prompt_tokens + sum(decided) * fanout.samples
    if total > settings.max_request_tokens or min(decided) < (1 if new_tokens.asked is None else 0):
        raise ApiError(
            400,
            "invalid_request",
            f"this request asks for {excerpt_int(max(total, prompt_tokens + rows))} tokens (prompts and new tokens over its "
            f"{rows} engine requests), over the limit of {settings.max_request_tokens} per request: send fewer "
            "prompts, samples or new tokens",
            param=new_tokens.field,
            code="invalid_value",
        )
    per_new_token = 0 if fanout.logprobs is None else fanout.logprobs + 1
    per_prompt_token = 0 if fanout.prompt_logprobs is None else fanout.prompt_logprobs + 1
    entries = fanout.choices * sum(
        len(prompt) * per_prompt_token + budget * per_new_token
        for prompt, budget in zip(prompts, decided, strict=True)
    )
    if entries > settings.max_request_logprobs:
        raise ApiError(
            400,
            "invalid_request",
            f"the answer would hold {excerpt_int(entries)} logprob entries (tokens × (logprobs + 1) over its choices), "
            f"over the limit of {settings.max_request_logprobs}: ask for fewer prompts, choices, tokens or "
            "alternatives",
            param="logprobs",
            code="invalid_value",
        )
    return decided


def _tokens(state: AppState, prompt: str | list[int], add_special_tokens: bool) -> list[int]:
    if not isinstance(prompt, str):
        return prompt
    prompt_ids = state.base.tokenizer(prompt, add_special_tokens=add_special_tokens).input_ids
    if not prompt_ids:
        raise ApiError(400, "invalid_request", "the prompt encodes to no tokens")
    return prompt_ids


def _check_vocabulary(state: AppState, token_ids: Mapping[str, Sequence[int]]) -> None:
    """Every token id a request names is in the vocabulary (400 naming the field)."""
    vocab = state.base.model.config.vocab_size
    for field, ids in token_ids.items():
        if any(not 0 <= token < vocab for token in ids):
            raise ApiError(
                400,
                "invalid_request",
                f"{field}: token ids must be below {vocab}",
                param=field,
                code="invalid_value",
            )


def _check_stop_sequences(state: AppState, stop: Sequence[str]) -> None:
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


async def _prefix_tokens(state: AppState, who: Caller, task_id: str | None, longest: int, wanted: int) -> int:
    """The task's virtual tokens, read from the store only where the longest prefix the server takes could
    change the answer. 0 where the store cannot tell (a resident prefix may still serve; the engine checks
    again once it is pinned). Raises ``PrefixNotFound``."""
    if task_id is None:
        return 0
    worst = state.settings.max_virtual_tokens
    room = _room(state, worst, longest)
    if wanted <= room:
        return 0
    try:
        record = await asyncio.to_thread(state.store.head, who.tenant, task_id)
    except StoreUnavailable:
        return 0
    return record.num_virtual_tokens


def _room(state: AppState, prefix: int, prompt: int) -> int:
    """New tokens that fit both the model's positions and the batch's token budget."""
    budget = state.engine.token_budget - prefix - prompt
    context = context_room(state.base, prefix, prompt)
    return budget if context is None else min(budget, context)


def _new_tokens(
    state: AppState, prefix: int, prompt: int, wanted: int, new_tokens: NewTokens, prompt_field: str
) -> int:
    """One prompt's ``max_new_tokens``: as asked if it fits, else the default cut to what fits."""
    context = context_room(state.base, prefix, prompt)
    budget = state.engine.token_budget - prefix - prompt
    least = 1 if new_tokens.asked is None else new_tokens.asked  # the new tokens that must fit
    if context is not None and context < least:
        assert state.base.max_positions is not None
        raise ContextLengthExceeded(
            context=state.base.max_positions,
            prefix=prefix,
            prompt=prompt,
            room=context,
            asked=new_tokens.asked,
            field=new_tokens.field,
            prompt_field=prompt_field,
            encoder_decoder=state.base.encoder_decoder is not None,
        )
    if budget < least:
        raise RequestTooLarge(prefix + prompt + least, state.engine.token_budget)
    if new_tokens.asked is not None:
        return new_tokens.asked
    return min(wanted, budget if context is None else min(context, budget))
