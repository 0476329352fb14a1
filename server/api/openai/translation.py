"""Translation between OpenAI's wire format and the serving layer (``server.api.serving``): ``model`` → task
id, OpenAI's sampling fields → ``SamplingParams``, chat messages → the chat template's prompt, engine
outputs → completions, chat completions and their SSE chunks."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator

from fastapi import Request
from fastapi.responses import StreamingResponse
from jinja2 import TemplateError
from pydantic import BaseModel

from prefix_store.errors import InvalidName, PrefixNotFound, StoreUnavailable
from prefix_store.storage.names import validate_task_id
from server.api.errors import ApiError
from server.api.openai.protocol import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    ChatMessage,
    Completion,
    CompletionChoice,
    FinishReasonName,
    GenerationFields,
    ModelCard,
    ModelList,
    UsageInfo,
)
from server.api.serving import UNFINISHED, result_unless_disconnected, submit
from server.api.sse import DONE, event_stream, sse_event
from server.api.state import AppState, Caller
from server.engine.async_engine import RequestStream
from server.engine.base_model import BaseModel as BaseLM
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationResult
from server.engine.sampling import SamplingParams

_FINISH: dict[FinishReason, FinishReasonName] = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
}


def unknown_model(model: str) -> ApiError:
    return ApiError(404, "not_found", f"the model {model!r} does not exist (see GET /v1/models)")


def resolve_task(state: AppState, model: str) -> str | None:
    """The task id ``model`` names in the caller's tenant; None for the base model (which wins a tie)."""
    if model == state.base.model_id:
        return None
    try:
        return validate_task_id(model)
    except InvalidName:
        raise unknown_model(model) from None


def sampling_params(body: GenerationFields) -> SamplingParams:
    temperature = 1.0 if body.temperature is None else body.temperature
    top_p = 1.0 if body.top_p is None else body.top_p
    if top_p == 0.0:  # nucleus sampling's limit: only the most likely token
        temperature, top_p = 0.0, 1.0
    return SamplingParams(temperature, body.top_k or 0, top_p, body.seed)


async def default_max_tokens(state: AppState, who: Caller, task_id: str | None, prompt_tokens: int) -> int:
    """OpenAI chat's default, "as many as fit": the server's ``max_new_tokens``, fewer where the
    model's positions (prefix + prompt + new tokens) run out first."""
    room = state.settings.max_new_tokens
    if state.base.max_positions is None:
        return room
    free = state.base.max_positions - prompt_tokens
    if task_id is not None and free < room:  # the prefix takes positions too: learn its length
        try:
            record = await asyncio.to_thread(state.store.head, who.tenant, task_id)
            free -= record.num_virtual_tokens
        except PrefixNotFound:
            raise unknown_model(task_id) from None
        except StoreUnavailable:
            pass  # a resident prefix may still serve; if it does not fit, the engine says so (413)
    return max(1, min(room, free))


async def respond(
    state: AppState,
    who: Caller,
    http_request: Request,
    body: GenerationFields,
    *,
    prompt_ids: list[int],
    task_id: str | None,
    max_new_tokens: int,
    chat: bool,
) -> Completion | ChatCompletion | StreamingResponse:
    """Submit through the serving layer, then answer as OpenAI does: one JSON body or an SSE stream.
    Errors (unknown model, limits, queue full) raise before any output."""
    http_request.state.task_id = task_id  # for the access log
    try:
        stream = await submit(
            state,
            who,
            prompt_ids=prompt_ids,
            task_id=task_id,
            sampling=sampling_params(body),
            max_new_tokens=max_new_tokens,
            stop=body.stop_sequences,
            id_prefix="chatcmpl" if chat else "cmpl",
        )
    except PrefixNotFound:
        raise unknown_model(body.model) from None
    if body.stream:
        events = stream_events(stream, body.model, http_request, chat=chat, include_usage=body.include_usage)
        return event_stream(events)
    result = await result_unless_disconnected(http_request, stream)
    http_request.state.completion_tokens = len(result.token_ids)
    return (chat_completion if chat else completion)(stream, result, body.model)


def render_chat(base: BaseLM, messages: list[ChatMessage]) -> str:
    """The prompt text of ``messages`` by the tokenizer's chat template, ready for the reply."""
    if not getattr(base.tokenizer, "chat_template", None):
        raise ApiError(
            400, "invalid_request", f"the model {base.model_id!r} has no chat template: use /v1/completions"
        )
    try:
        return base.tokenizer.apply_chat_template(
            [message.for_template() for message in messages], tokenize=False, add_generation_prompt=True
        )
    except (TemplateError, ValueError, TypeError) as exc:
        raise ApiError(
            400, "invalid_request", f"the chat template refused the messages: {exc}"[:500]
        ) from None


def finish_reason(reason: FinishReason) -> FinishReasonName:
    """OpenAI's name for how a request finished; raises for a request that did not finish."""
    if reason in _FINISH:
        return _FINISH[reason]
    raise ApiError(*UNFINISHED[reason])


def usage(prompt_tokens: int, completion_tokens: int) -> UsageInfo:
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
    )


def completion(stream: RequestStream, result: GenerationResult, model: str) -> Completion:
    return Completion(
        id=result.request_id,
        created=int(time.time()),
        model=model,
        system_fingerprint=stream.prefix_version,
        choices=[CompletionChoice(text=result.text, finish_reason=finish_reason(result.finish_reason))],
        usage=usage(result.prompt_tokens, len(result.token_ids)),
    )


def chat_completion(stream: RequestStream, result: GenerationResult, model: str) -> ChatCompletion:
    return ChatCompletion(
        id=result.request_id,
        created=int(time.time()),
        model=model,
        system_fingerprint=stream.prefix_version,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=result.text),
                finish_reason=finish_reason(result.finish_reason),
            )
        ],
        usage=usage(result.prompt_tokens, len(result.token_ids)),
    )


class _ChunkFormat:
    """How one endpoint shapes its stream chunks: completions' or chat's."""

    def __init__(self, stream: RequestStream, model: str, *, chat: bool) -> None:
        self.chat = chat
        self.common = {
            "id": stream.request.request_id,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": stream.prefix_version,
        }

    def opening(self) -> BaseModel | None:
        """Chat streams open with the assistant's role and no content, as OpenAI's do."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return ChatCompletionChunk(**self.common, choices=[ChatChunkChoice(delta=delta)])

    def text(self, text: str, reason: FinishReasonName | None = None) -> BaseModel:
        if self.chat:
            delta = {"content": text} if text else {}
            return ChatCompletionChunk(
                **self.common, choices=[ChatChunkChoice(delta=delta, finish_reason=reason)]
            )
        return Completion(**self.common, choices=[CompletionChoice(text=text, finish_reason=reason)])

    def usage(self, info: UsageInfo) -> BaseModel:
        if self.chat:
            return ChatCompletionChunk(**self.common, choices=[], usage=info)
        return Completion(**self.common, choices=[], usage=info)


async def stream_events(
    stream: RequestStream, model: str, http_request: Request, *, chat: bool, include_usage: bool
) -> AsyncIterator[str]:
    """OpenAI's SSE: a chunk per piece of text, the finish reason on the last, the usage (if asked),
    then ``data: [DONE]``. A request that ends without finishing (deadline, engine error, shutdown)
    sends ``{"error": {"type", "message"}}`` instead, which the official client raises as ``APIError``.
    If the client goes away, the stream is closed and the engine request aborted.
    """
    chunks = _ChunkFormat(stream, model, chat=chat)
    try:
        opening = chunks.opening()
        if opening is not None:
            yield sse_event(opening)
        async for output in stream:
            if output.finish_reason is None:
                if output.text:
                    yield sse_event(chunks.text(output.text))
                continue
            http_request.state.completion_tokens = output.completion_tokens  # for the access log
            if output.finish_reason not in _FINISH:
                _, error_type, message = UNFINISHED[output.finish_reason]
                yield sse_event({"error": {"type": error_type, "message": message}})
                break
            yield sse_event(chunks.text(output.text, _FINISH[output.finish_reason]))
            if include_usage:
                yield sse_event(chunks.usage(usage(output.prompt_tokens, output.completion_tokens)))
        yield DONE
    finally:
        stream.abort()  # a no-op once finished; else the client left mid-stream


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
