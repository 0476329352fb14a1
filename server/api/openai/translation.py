"""Translation between OpenAI's wire format and the serving layer (``server.api.serving``): ``model`` → task
id, OpenAI's sampling, logprob and structured-output fields → the engine request, chat messages → the chat
template's prompt; ``answers`` turns the results into OpenAI's responses and SSE chunks."""

from __future__ import annotations

import asyncio
import time
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from jinja2 import TemplateError

from prefix_store.errors import InvalidName, PrefixNotFound
from prefix_store.storage.excerpt import excerpt
from prefix_store.storage.names import validate_task_id
from server.api.errors import ApiError
from server.api.openai.answers import chat_completion, completion, json_answer, stream_events
from server.api.openai.choices import best_of, finished
from server.api.openai.protocol import (
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationFields,
)
from server.api.openai.responses import ModelCard, ModelList
from server.api.plan import Fanout, NewTokens, RequestPlan, plan_request
from server.api.serving import Row, submit
from server.api.sse import event_stream
from server.api.state import AppState, Caller
from server.engine.base_model import BaseModel as BaseLM
from server.engine.grammar import Grammar, GrammarError
from server.engine.sampling import SamplingParams


def model_task(state: AppState, model: str) -> str | None:
    """The task ``model`` names in the caller's tenant (checked as a name by the plan; on these routes a
    name that breaks the rule is an unknown model); None for the base model, which wins a tie."""
    return None if model == state.base.model_id else model


async def plan(
    state: AppState, who: Caller, body: GenerationFields, prompts: list[str | list[int]], *, chat: bool
) -> RequestPlan:
    """The request's plan (``plan.plan_request``): chat's one prompt is the template's text, which holds its
    own special tokens."""
    asked, field = body.asked_max_tokens
    return await plan_request(
        state,
        who,
        task_id=model_task(state, body.model),
        prompts=prompts,
        new_tokens=NewTokens(asked, field, body.UNSET_MAX_TOKENS),
        prompt_field=body.PROMPT_FIELD,
        add_special_tokens=not chat,
        stop=body.stop_sequences,
        min_tokens=body.min_tokens or 0,
        token_ids={"stop_token_ids": body.stop_token_ids or [], "logit_bias": [t for t, _ in body.bias]},
        fanout=Fanout(body.samples_per_prompt, body.choices_per_prompt, *logprob_options(body)),
        cache_salt=body.cache_salt,
    )


def sampling_params(body: GenerationFields, sample: int = 0) -> SamplingParams:
    """The engine's sampling for sample ``sample`` of a prompt: with a seed, sample i draws with seed + i, so
    a request's samples differ and the request is reproducible."""
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:  # nucleus sampling's limit: only the most likely token
        temperature, top_p = 0.0, 1.0
    return SamplingParams(
        temperature,
        body.top_k or 0,
        top_p,
        None if body.seed is None else (body.seed + sample) % 2**63,
        presence_penalty=body.presence_penalty or 0.0,
        frequency_penalty=body.frequency_penalty or 0.0,
        repetition_penalty=body.repetition_penalty or 1.0,
        logit_bias=body.bias,
    )


def logprob_options(body: GenerationFields) -> tuple[int | None, int | None]:
    """(logprobs of the new tokens, of the prompt's) as the engine takes them: alternatives, or None."""
    if isinstance(body, CompletionRequest):
        return body.logprobs, body.logprobs if body.echo and body.logprobs is not None else None
    if isinstance(body, ChatCompletionRequest) and body.logprobs:
        return body.top_logprobs or 0, None
    return None, None


async def grammar_for(state: AppState, who: Caller, body: GenerationFields) -> Grammar | None:
    """The compiled constraint of chat's ``response_format`` (off the event loop, cached per tenant)."""
    if not isinstance(body, ChatCompletionRequest) or body.response_format is None:
        return None
    schema = body.response_format.constraint
    if schema is None:
        return None
    try:
        return await asyncio.to_thread(state.grammars.json_schema, schema, scope=who.tenant)
    except GrammarError as exc:
        raise ApiError(
            400, "invalid_request", str(exc), param="response_format", code="invalid_value"
        ) from None


async def respond(
    state: AppState,
    who: Caller,
    http_request: Request,
    body: GenerationFields,
    plan: RequestPlan,
    *,
    chat: bool,
) -> Response:
    """Submit ``samples_per_prompt`` engine requests per prompt of ``plan`` through the serving layer, then
    answer as OpenAI does: one JSON body or an SSE stream, one choice per prompt and sample (with
    ``best_of``, the ``n`` samples of each prompt with the highest total logprob). Errors (unknown model,
    limits, queue full) raise before any output, and end what was submitted."""
    http_request.state.task_id = plan.task_id  # for the access log
    logprobs, prompt_logprobs = logprob_options(body)
    samples = body.samples_per_prompt
    ranked = samples > body.choices_per_prompt  # best_of: the samples' logprobs pick the choices
    grammar = await grammar_for(state, who, body)
    rows = [
        Row(prompt, sampling_params(body, sample), logprobs=0 if ranked and logprobs is None else logprobs)
        for prompt in range(len(plan.prompts))
        for sample in range(samples)
    ]
    streams = await submit(
        state,
        who,
        plan,
        rows,
        ignore_eos=bool(body.ignore_eos),
        id_prefix="chatcmpl" if chat else "cmpl",
        prompt_logprobs=prompt_logprobs,
        min_tokens=body.min_tokens or 0,
        stop_token_ids=tuple(body.stop_token_ids or ()),
        grammar=grammar,
    )
    if body.stream:
        return event_stream(stream_events(state, streams, body, http_request, chat=chat))
    results = await finished(http_request, streams)
    # every sample's tokens, as OpenAI counts them; each prompt's cached tokens once
    completion_tokens = sum(len(result.token_ids) for _, result in results)
    cached_tokens = sum(result.cached_tokens for _, result in results[::samples])
    http_request.state.completion_tokens = completion_tokens  # for the access log
    if ranked:
        results = best_of(results, samples, body.choices_per_prompt, keep_logprobs=logprobs is not None)
    if chat:
        return await json_answer(
            lambda: chat_completion(
                state, results, body.model, plan.prompt_tokens, completion_tokens, cached_tokens
            )
        )
    return await json_answer(
        lambda: completion(state, results, body, plan.prompt_tokens, completion_tokens, cached_tokens)
    )


def render_chat(base: BaseLM, messages: list[ChatMessage], variables: dict[str, Any] | None = None) -> str:
    """The prompt text of ``messages`` by the tokenizer's chat template, ready for the reply; ``variables``
    (``chat_template_kwargs``) are more names the template sees."""
    if not getattr(base.tokenizer, "chat_template", None):
        raise ApiError(
            400, "invalid_request", f"the model {base.model_id!r} has no chat template: use /v1/completions"
        )
    try:
        return base.tokenizer.apply_chat_template(
            [message.for_template() for message in messages],
            tokenize=False,
            add_generation_prompt=True,
            **(variables or {}),
        )
    except (TemplateError, ValueError, TypeError) as exc:
        raise ApiError(
            400, "invalid_request", f"the chat template refused the messages: {exc}"[:500]
        ) from None


async def list_models(state: AppState, who: Caller) -> ModelList:
    """The base model, then the caller tenant's tasks."""
    records = await asyncio.to_thread(state.store.list, who.tenant)
    base = state.base.model_id
    return ModelList(
        data=[
            ModelCard(id=base, created=int(time.time()), owned_by="prefix-serve"),
            *(
                ModelCard(id=r.task_id, created=int(r.created_at), owned_by=who.tenant, parent=base)
                for r in records
                if r.task_id != base
            ),
        ]
    )


async def get_model(state: AppState, who: Caller, model: str) -> ModelCard:
    """The card of the base model or of a task of the caller's tenant (``PrefixNotFound`` for anything else,
    a name that breaks the rule included)."""
    task_id = model_task(state, model)
    if task_id is None:
        return ModelCard(id=model, created=int(time.time()), owned_by="prefix-serve")
    try:
        validate_task_id(task_id)
    except InvalidName:
        raise PrefixNotFound(f"no prefix named {excerpt(model)}", name=model) from None
    record = await asyncio.to_thread(state.store.head, who.tenant, task_id)
    return ModelCard(
        id=record.task_id, created=int(record.created_at), owned_by=who.tenant, parent=state.base.model_id
    )
