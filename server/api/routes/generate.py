"""``POST /v1/generate``: JSON, or server-sent events with ``"stream": true``."""

from __future__ import annotations

from collections.abc import AsyncIterator

from fastapi import APIRouter, Depends, Request
from fastapi.responses import StreamingResponse

from server.api.errors import error_responses
from server.api.plan import NewTokens, plan_request
from server.api.schemas import (
    DEFAULT_MAX_NEW_TOKENS,
    GENERATION_RESPONSES,
    GenerateBody,
    GenerateResponse,
    Usage,
)
from server.api.serving import Row, result_unless_disconnected, submit
from server.api.sse import DONE, event_stream, sse_event
from server.api.state import CallerDep, StateDep, caller
from server.engine.async_engine import RequestStream
from server.engine.sampling import SamplingParams

router = APIRouter(
    prefix="/v1", tags=["generate"], dependencies=[Depends(caller)], responses=error_responses(401, 503)
)


@router.post("/generate", response_model=GenerateResponse, responses=GENERATION_RESPONSES)
async def generate(
    body: GenerateBody, http_request: Request, state: StateDep, who: CallerDep
) -> GenerateResponse | StreamingResponse:
    http_request.state.task_id = body.task_id  # for the access log
    asked = body.max_new_tokens if "max_new_tokens" in body.model_fields_set else None
    plan = await plan_request(
        state,
        who,
        task_id=body.task_id,
        prompts=[body.prompt],
        new_tokens=NewTokens(asked, "max_new_tokens", DEFAULT_MAX_NEW_TOKENS),
        stop=body.stop,
        cache_salt=body.cache_salt,
    )
    sampling = SamplingParams(body.temperature, body.top_k, body.top_p, body.seed)
    (stream,) = await submit(state, who, plan, [Row(0, sampling)])
    if body.stream:
        return event_stream(_events(stream, body.task_id))
    result = await result_unless_disconnected(http_request, stream)
    return GenerateResponse(
        id=result.request_id,
        task_id=body.task_id,
        prefix_version=stream.prefix_version,
        text=result.text,
        token_ids=result.token_ids,
        finish_reason=result.finish_reason.value,
        usage=Usage(
            prompt_tokens=result.prompt_tokens,
            completion_tokens=len(result.token_ids),
            cached_tokens=result.cached_tokens,
        ),
    )


async def _events(stream: RequestStream, task_id: str | None) -> AsyncIterator[str]:
    """One event per token, a final event with the finish reason and usage, then ``[DONE]``.

    If the client disconnects, Starlette stops this generator and the stream aborts the request.
    """
    async for output in stream:
        for i, token_id in enumerate(output.token_ids):
            text = output.text if i == len(output.token_ids) - 1 else ""
            yield sse_event({"token_id": token_id, "text": text})
        if output.finish_reason is not None:
            yield sse_event(
                {
                    "id": output.request_id,
                    "task_id": task_id,
                    "prefix_version": stream.prefix_version,
                    "finish_reason": output.finish_reason.value,
                    "usage": {
                        "prompt_tokens": output.prompt_tokens,
                        "completion_tokens": output.completion_tokens,
                        "cached_tokens": output.cached_tokens,
                    },
                }
            )
    yield DONE
