"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, as OpenAI's clients expect them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import Response

from server.api.errors import error_responses
from server.api.openai import translation
from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest
from server.api.openai.responses import ChatCompletion, Completion, ModelCard, ModelList
from server.api.schemas import GENERATION_RESPONSES
from server.api.state import CallerDep, StateDep, caller

router = APIRouter(
    prefix="/v1",
    tags=["openai"],
    dependencies=[Depends(caller)],
    responses=error_responses(401, 503, openai=True),
)
# what the generation routes answer: GENERATION_RESPONSES' 200, OpenAI's errors (schema errors are 400)
_GENERATION_RESPONSES = {200: GENERATION_RESPONSES[200], **error_responses(400, 404, 429, 504, openai=True)}


@router.get("/models", response_model=ModelList)
async def list_models(state: StateDep, who: CallerDep) -> ModelList:
    return await translation.list_models(state, who)


@router.get(
    "/models/{model}", response_model=ModelCard, responses=error_responses(400, 404, openai=True)
)  # 400: a control character in the path
async def get_model(model: str, state: StateDep, who: CallerDep) -> ModelCard:
    return await translation.get_model(state, who, model)


@router.post("/completions", response_model=Completion, responses=_GENERATION_RESPONSES)
async def create_completion(
    body: CompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> Response:
    plan = await translation.plan(state, who, body, body.prompts, chat=False)
    return await translation.respond(state, who, http_request, body, plan, chat=False)


@router.post("/chat/completions", response_model=ChatCompletion, responses=_GENERATION_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> Response:
    prompt = translation.render_chat(state.base, body.messages, body.chat_template_kwargs)
    plan = await translation.plan(state, who, body, [prompt], chat=True)
    return await translation.respond(state, who, http_request, body, plan, chat=True)
