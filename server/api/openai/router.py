"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, as OpenAI's clients expect them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.errors import error_responses
from server.api.openai import translation
from server.api.openai.protocol import (
    ChatCompletion,
    ChatCompletionRequest,
    Completion,
    CompletionRequest,
    ModelCard,
    ModelList,
)
from server.api.schemas import GENERATION_RESPONSES
from server.api.serving import max_new_tokens, tokenize_prompt
from server.api.state import CallerDep, StateDep, caller

router = APIRouter(
    prefix="/v1", tags=["openai"], dependencies=[Depends(caller)], responses=error_responses(401, 503)
)


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, who: CallerDep) -> ModelList:
    return await translation.list_models(state, who)


@router.get(
    "/models/{model}", response_model=ModelCard, responses=error_responses(400, 404, 422)
)  # 400: a control character in the path
async def get_model(model: str, state: StateDep, who: CallerDep) -> ModelCard:
    return await translation.get_model(state, who, model)


@router.post("/completions", response_model=Completion, responses=GENERATION_RESPONSES)
async def create_completion(
    body: CompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> Completion | ChatCompletion | StreamingResponse:
    task_id = translation.resolve_task(state, body.model)
    prompt_ids = tokenize_prompt(state, body.prompt)
    return await translation.respond(
        state,
        who,
        http_request,
        body,
        prompt_ids=prompt_ids,
        task_id=task_id,
        max_new_tokens=max_new_tokens(
            state, body.max_new_tokens, explicit=body.max_tokens is not None, field="max_tokens"
        ),
        chat=False,
    )


@router.post("/chat/completions", response_model=ChatCompletion, responses=GENERATION_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> Completion | ChatCompletion | StreamingResponse:
    task_id = translation.resolve_task(state, body.model)
    prompt_ids = tokenize_prompt(
        state, translation.render_chat(state.base, body.messages), add_special_tokens=False
    )
    asked = body.max_new_tokens
    field = "max_completion_tokens" if body.max_completion_tokens is not None else "max_tokens"
    fit = asked or await translation.default_max_tokens(state, who, task_id, len(prompt_ids))
    return await translation.respond(
        state,
        who,
        http_request,
        body,
        prompt_ids=prompt_ids,
        task_id=task_id,
        max_new_tokens=max_new_tokens(state, fit, explicit=asked is not None, field=field),
        chat=True,
    )
