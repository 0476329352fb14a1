"""``POST /v1/generate``."""

from __future__ import annotations

import asyncio
import uuid

from fastapi import APIRouter

from server.api.errors import ApiError
from server.api.schemas import GenerateBody, GenerateResponse, Usage
from server.api.state import CallerDep, StateDep
from server.engine.generation import GenerationRequest
from server.engine.sampling import SamplingParams

router = APIRouter(prefix="/v1", tags=["generate"])


@router.post("/generate", response_model=GenerateResponse)
async def generate(body: GenerateBody, state: StateDep, who: CallerDep) -> GenerateResponse:
    settings = state.settings
    if body.stream:
        raise ApiError(
            400, "invalid_request", "streaming arrives with the batching engine; send stream=false"
        )
    if body.max_new_tokens > settings.max_new_tokens:
        raise ApiError(
            422, "validation_error", f"max_new_tokens is over the limit of {settings.max_new_tokens}"
        )
    if len(body.stop) > settings.max_stop_sequences or any(
        not s or len(s) > settings.max_stop_sequence_chars for s in body.stop
    ):
        raise ApiError(
            422,
            "validation_error",
            f"stop takes at most {settings.max_stop_sequences} non-empty sequences of at most "
            f"{settings.max_stop_sequence_chars} characters",
        )
    resident = (
        await asyncio.to_thread(state.registry.acquire, who.tenant, body.task_id) if body.task_id else None
    )
    prompt_ids = state.base.tokenizer(body.prompt).input_ids
    if len(prompt_ids) > settings.max_prompt_tokens:
        raise ApiError(
            413,
            "payload_too_large",
            f"the prompt has {len(prompt_ids)} tokens, over the limit of {settings.max_prompt_tokens}",
        )
    request = GenerationRequest(
        request_id=f"gen-{uuid.uuid4().hex}",
        prompt_ids=prompt_ids,
        prefix=resident.prefix if resident else None,
        sampling=SamplingParams(body.temperature, body.top_k, body.top_p, body.seed),
        max_new_tokens=body.max_new_tokens,
        stop_sequences=tuple(body.stop),
    )
    result = await state.engine.generate(request)
    return GenerateResponse(
        id=result.request_id,
        task_id=body.task_id,
        prefix_version=resident.record.version if resident else None,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason.value,
        usage=Usage(prompt_tokens=result.prompt_tokens, completion_tokens=len(result.token_ids)),
    )
