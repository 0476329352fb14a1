"""``/v1/models``, ``/v1/completions`` and ``/v1/chat/completions``, as OpenAI's clients expect them."""

from __future__ import annotations

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.errors import error_responses
from server.api.openai import translation
from server.api.openai.protocol import ChatCompletionRequest, CompletionRequest, GenerationFields
from server.api.openai.responses import ChatCompletion, Completion, ModelCard, ModelList
from server.api.schemas import GENERATION_RESPONSES
from server.api.serving import tokenize
from server.api.state import AppState, Caller, CallerDep, StateDep, caller

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
) -> Completion | ChatCompletion | StreamingResponse:
    prompts = [
        tokenize(state, prompt) if isinstance(prompt, str) else translation.checked_ids(state, prompt)
        for prompt in body.prompts
    ]
    return await _generate(state, who, http_request, body, prompts, chat=False)


@router.post("/chat/completions", response_model=ChatCompletion, responses=_GENERATION_RESPONSES)
async def create_chat_completion(
    body: ChatCompletionRequest, http_request: Request, state: StateDep, who: CallerDep
) -> Completion | ChatCompletion | StreamingResponse:
    prompt = translation.render_chat(state.base, body.messages, body.chat_template_kwargs)
    prompt_ids = tokenize(state, prompt, add_special_tokens=False)  # the template holds its own
    return await _generate(state, who, http_request, body, [prompt_ids], chat=True)


async def _generate(
    state: AppState,
    who: Caller,
    http_request: Request,
    body: GenerationFields,
    prompts: list[list[int]],
    *,
    chat: bool,
) -> Completion | ChatCompletion | StreamingResponse:
    task_id = translation.resolve_task(state, body.model)
    return await translation.respond(
        state,
        who,
        http_request,
        body,
        prompts=prompts,
        task_id=task_id,
        max_new_tokens=await translation.decide_max_tokens(
            state, who, body, task_id, [len(prompt_ids) for prompt_ids in prompts]
        ),
        chat=chat,
    )
