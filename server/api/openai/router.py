"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, as OpenAI's clients expect them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.engine_calls import result_unless_disconnected, tokenize_prompt
from server.api.openai import serving
from server.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from server.api.state import CallerDep, StateDep, caller

router = APIRouter(prefix="/v1", tags=["openai"], dependencies=[Depends(caller)])

_SSE_HEADERS = {"Cache-Control": "no-cache", "X-Accel-Buffering": "no"}  # no proxy buffering


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, who: CallerDep) -> ModelList:
    return await serving.list_models(state, who)


@router.get("/models/{model}", response_model=ModelCard)
async def get_model(model: str, state: StateDep, who: CallerDep) -> ModelCard:
    return await serving.get_model(state, who, model)


@router.post("/completions", response_model=Completion)
async def create_completion(
    body: CompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> Completion | StreamingResponse:
    task_id = serving.resolve_task(state, body.model)
    prompt_ids = tokenize_prompt(state, body.prompt)
    stream = await serving.start(
        state,
        who,
        http_request,
        body,
        prompt_ids=prompt_ids,
        task_id=task_id,
        max_new_tokens=body.max_new_tokens,
        id_prefix="cmpl",
    )
    if body.stream:
        events = serving.stream_events(
            stream, body.model, http_request, chat=False, include_usage=body.include_usage
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    result = await result_unless_disconnected(http_request, stream, state.settings.request_timeout_s)
    http_request.state.completion_tokens = len(result.token_ids)
    return serving.completion(stream, result, body.model)


@router.post("/chat/completions", response_model=ChatCompletion)
async def create_chat_completion(
    body: ChatCompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> ChatCompletion | StreamingResponse:
    task_id = serving.resolve_task(state, body.model)
    prompt = serving.render_chat(state, body.messages)
    prompt_ids = tokenize_prompt(state, prompt, add_special_tokens=False)
    max_new_tokens = body.max_new_tokens or await serving.default_max_tokens(
        state, who, task_id, len(prompt_ids)
    )
    stream = await serving.start(
        state,
        who,
        http_request,
        body,
        prompt_ids=prompt_ids,
        task_id=task_id,
        max_new_tokens=max_new_tokens,
        id_prefix="chatcmpl",
    )
    if body.stream:
        events = serving.stream_events(
            stream, body.model, http_request, chat=True, include_usage=body.include_usage
        )
        return StreamingResponse(events, media_type="text/event-stream", headers=_SSE_HEADERS)
    result = await result_unless_disconnected(http_request, stream, state.settings.request_timeout_s)
    http_request.state.completion_tokens = len(result.token_ids)
    return serving.chat_completion(stream, result, body.model)
