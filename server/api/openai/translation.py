"""Translation between OpenAI's wire format and the serving layer (``server.api.serving``): ``model`` → task
id, OpenAI's sampling, logprob and structured-output fields → the engine request, chat messages → the chat
template's prompt; ``answers`` turns the results into OpenAI's responses and SSE chunks."""

from __future__ import annotations

import asyncio
import time
from dataclasses import replace
from typing import Any

from fastapi import Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError

from prefix_store.errors import InvalidName, PrefixNotFound
from prefix_store.storage.names import validate_task_id
from server.api.errors import ApiError
from server.api.openai.answers import chat_completion, completion, stream_events
from server.api.openai.choices import best_of, finished, submitted
from server.api.openai.protocol import (
    CHAT_DEFAULT_MAX_TOKENS,
    ChatCompletionRequest,
    ChatMessage,
    CompletionRequest,
    GenerationFields,
)
from server.api.openai.responses import ChatCompletion, Completion, ModelCard, ModelList
from server.api.serving import (
    ContextUse,
    context_use,
    max_new_tokens,
    submit,
)
from server.api.sse import event_stream
from server.api.state import AppState, Caller
from server.engine.base_model import BaseModel as BaseLM
from server.engine.grammar import Grammar, GrammarError
from server.engine.request import RequestTooLong
from server.engine.sampling import SamplingParams


def unknown_model(model: str) -> ApiError:
    return ApiError(
        404,
        "not_found",
        f"the model {model!r} does not exist (see GET /v1/models)",
        param="model",
        code="model_not_found",
    )


def resolve_task(state: AppState, model: str) -> str | None:
    """The task id ``model`` names in the caller's tenant; None for the base model (which wins a tie)."""
    if model == state.base.model_id:
        return None
    try:
        return validate_task_id(model)
    except InvalidName:
        raise unknown_model(model) from None


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


def checked_ids(state: AppState, prompt_ids: list[int]) -> list[int]:
    """A prompt given as token ids: each must be in the vocabulary (400 naming ``prompt``)."""
    vocab = state.base.model.config.vocab_size
    if any(token >= vocab for token in prompt_ids):
        raise ApiError(
            400,
            "invalid_request",
            f"prompt: token ids must be below {vocab}",
            param="prompt",
            code="invalid_value",
        )
    return prompt_ids


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


async def decide_max_tokens(
    state: AppState, who: Caller, body: GenerationFields, task_id: str | None, prompt_lengths: list[int]
) -> list[int]:
    """Each prompt's ``max_new_tokens``: ``max_tokens`` as asked (over the server's ``--max-new-tokens``:
    400), else the route's default cut to what fits. 400 ``context_length_exceeded`` when a prompt is over
    the server's limit, or prefix + prompt (+ ``max_tokens`` as asked) do not fit the model's context. The
    prefix's length is looked up once for all the prompts."""
    asked, field = body.asked_max_tokens
    unset = body.UNSET_MAX_TOKENS or state.settings.max_new_tokens or CHAT_DEFAULT_MAX_TOKENS
    wanted = max_new_tokens(state, unset if asked is None else asked, explicit=asked is not None, field=field)
    longest = max(prompt_lengths)
    if longest > state.settings.max_prompt_tokens:
        raise _prompt_over_limit(state, body, longest)
    try:
        longest_use = await context_use(state, who, task_id, longest, new_tokens=wanted)
    except PrefixNotFound:
        raise unknown_model(body.model) from None
    decided = []
    for length in prompt_lengths:
        use = replace(longest_use, prompt=length)
        if use.room is not None and (use.room < 1 or (asked is not None and asked > use.room)):
            raise context_length_exceeded(use, body)
        decided.append(wanted if use.room is None else min(wanted, use.room))
    return decided


def context_length_exceeded(use: ContextUse, body: GenerationFields) -> ApiError:
    """OpenAI's 400 for a request over the model's context, in OpenAI's words: "This model's maximum
    context length is" is what LiteLLM (its ``ContextWindowExceededError``) and others look for. ``param``
    is the prompt's field if the prompt alone is too long or ``max_tokens`` was unset, else that field."""
    asked, field = body.asked_max_tokens
    where, taken = body.PROMPT_FIELD, use.prefix + use.prompt
    parts = f"{use.prompt} in the {where}" + (f", {use.prefix} in the task's prefix" if use.prefix else "")
    if asked is None:
        requested = f"your {where} resulted in {taken} tokens" + (f" ({parts})" if use.prefix else "")
    else:
        requested = f"you requested {taken + asked} tokens ({parts}, {asked} in the completion)"
    prompt_alone = asked is None or use.room is None or use.room < 1
    return ApiError(
        400,
        "invalid_request",
        f"This model's maximum context length is {use.context} tokens. However, {requested}. Please "
        f"reduce the length of the {where}{'' if prompt_alone else ' or completion'}.",
        param=where if prompt_alone else field,
        code="context_length_exceeded",
    )


def _prompt_over_limit(state: AppState, body: GenerationFields, prompt_tokens: int) -> ApiError:
    """The 400 for a prompt over the server's ``max_prompt_tokens``, in words LiteLLM also recognises."""
    where, context = body.PROMPT_FIELD, state.base.max_positions
    message = [
        f"This model's maximum context length is {context} tokens." if context else "",
        f"This server's maximum input length is {state.settings.max_prompt_tokens} tokens.",
        f"However, your {where} resulted in {prompt_tokens} tokens. Please reduce the length of the {where}.",
    ]
    return ApiError(
        400,
        "invalid_request",
        " ".join(filter(None, message)),
        param=where,
        code="context_length_exceeded",
    )


async def respond(
    state: AppState,
    who: Caller,
    http_request: Request,
    body: GenerationFields,
    *,
    prompts: list[list[int]],
    task_id: str | None,
    max_new_tokens: list[int],
    chat: bool,
) -> Completion | ChatCompletion | StreamingResponse:
    """Submit ``samples_per_prompt`` engine requests per prompt (``max_new_tokens[i]`` for prompt ``i``)
    through the serving layer, then answer as OpenAI does: one JSON body or an SSE stream, one choice per
    prompt and sample (with ``best_of``, the ``n`` samples of each prompt with the highest total logprob).
    Errors (unknown model, limits, queue full) raise before any output, and end what was submitted."""
    http_request.state.task_id = task_id  # for the access log
    logprobs, prompt_logprobs = logprob_options(body)
    samples = body.samples_per_prompt
    ranked = samples > body.choices_per_prompt  # best_of: the samples' logprobs pick the choices
    grammar = await grammar_for(state, who, body)
    submissions = (
        submit(
            state,
            who,
            prompt_ids=prompt_ids,
            task_id=task_id,
            sampling=sampling_params(body, sample),
            max_new_tokens=new_tokens,
            stop=body.stop_sequences,
            ignore_eos=bool(body.ignore_eos),
            id_prefix="chatcmpl" if chat else "cmpl",
            logprobs=0 if ranked and logprobs is None else logprobs,
            prompt_logprobs=prompt_logprobs,
            min_tokens=body.min_tokens or 0,
            stop_token_ids=tuple(body.stop_token_ids or ()),
            grammar=grammar,
        )
        for prompt_ids, new_tokens in zip(prompts, max_new_tokens, strict=True)
        for sample in range(samples)
    )
    try:
        streams = await submitted(submissions)
    except PrefixNotFound:
        raise unknown_model(body.model) from None
    except RequestTooLong as exc:  # the prefix's length was not known before (store down, replaced)
        raise ApiError(
            400,
            "invalid_request",
            f"This model's maximum context length is {state.base.max_positions} tokens. However, {exc}.",
            param=body.asked_max_tokens[1],
            code="context_length_exceeded",
        ) from None
    if body.stream:
        return event_stream(stream_events(state, streams, body, http_request, chat=chat))
    results = await finished(http_request, streams)
    if ranked:
        results = best_of(results, samples, body.choices_per_prompt, keep_logprobs=logprobs is not None)
    http_request.state.completion_tokens = sum(len(result.token_ids) for _, result in results)
    prompt_tokens = sum(len(ids) for ids in prompts)
    if chat:
        return chat_completion(state, results, body.model, prompt_tokens)
    return completion(state, results, body, prompt_tokens)


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
    task_id = resolve_task(state, model)
    if task_id is None:
        return ModelCard(id=model, created=int(time.time()), owned_by="prefix-serve")
    try:
        record = await asyncio.to_thread(state.store.head, who.tenant, task_id)
    except PrefixNotFound:
        raise unknown_model(model) from None
    return ModelCard(
        id=record.task_id, created=int(record.created_at), owned_by=who.tenant, parent=state.base.model_id
    )
