"""How the engine's results become OpenAI's answers: completions and chat completions, and their SSE
chunks (text, logprobs, usage, the finish reason; echo for completions)."""

from __future__ import annotations

import asyncio
import time
from collections.abc import AsyncIterator, Callable
from typing import Any

from fastapi import Request
from fastapi.responses import Response
from pydantic import BaseModel

from server.api.errors import openai_error, unfinished_error
from server.api.openai.logprobs import chat_logprobs, completion_logprobs
from server.api.openai.protocol import CompletionRequest, GenerationFields
from server.api.openai.responses import (
    AssistantMessage,
    ChatChoice,
    ChatChunkChoice,
    ChatCompletion,
    ChatCompletionChunk,
    Completion,
    CompletionChoice,
    FinishReasonName,
    PromptTokensDetails,
    UsageInfo,
)
from server.api.sse import DONE, sse_event
from server.api.state import AppState
from server.engine.async_engine import RequestStream
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationResult, RequestNotFinished, RequestOutput

_FINISH: dict[FinishReason, FinishReasonName] = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
}


async def json_answer(build: Callable[[], BaseModel]) -> Response:
    """The answer ``build`` makes, made and serialised off the event loop: a large one (a scoring request's
    prompt logprobs run to megabytes) would otherwise hold every other request while it is made."""
    body = await asyncio.to_thread(lambda: build().model_dump_json().encode())
    return Response(body, media_type="application/json")


def finish_reason(reason: FinishReason) -> FinishReasonName:
    """OpenAI's name for how a request finished; raises ``RequestNotFinished`` for one that did not."""
    if reason in _FINISH:
        return _FINISH[reason]
    raise RequestNotFinished(reason)


def usage(prompt_tokens: int, completion_tokens: int, cached_tokens: int = 0) -> UsageInfo:
    """OpenAI's usage; ``cached_tokens``: of the prompt tokens, those found cached (``prompt_tokens_details``)."""
    return UsageInfo(
        prompt_tokens=prompt_tokens,
        completion_tokens=completion_tokens,
        total_tokens=prompt_tokens + completion_tokens,
        prompt_tokens_details=PromptTokensDetails(cached_tokens=cached_tokens),
    )


def completion(
    state: AppState,
    results: list[tuple[RequestStream, GenerationResult]],
    body: GenerationFields,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> Completion:
    """One choice per result, in order (``index`` = its place); ``completion_tokens`` counts every sample
    generated (``best_of``'s too)."""
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    return Completion(
        id=results[0][1].request_id,
        created=int(time.time()),
        model=body.model,
        system_fingerprint=results[0][0].prefix_version,
        choices=[
            _completion_choice(state, index, stream.request.prompt_ids, result, echo=echo)
            for index, (stream, result) in enumerate(results)
        ],
        usage=usage(prompt_tokens, completion_tokens, cached_tokens),
    )


def _completion_choice(
    state: AppState, index: int, prompt_ids: list[int], result: GenerationResult, *, echo: bool
) -> CompletionChoice:
    prompt_text = state.base.tokenizer.decode(prompt_ids) if echo else ""
    logprobs = None
    if result.logprobs is not None:
        tokens = [(entry.token_id, entry) for entry in result.logprobs]
        if echo and result.prompt_logprobs is not None:
            tokens = [*zip(prompt_ids, result.prompt_logprobs, strict=True), *tokens]
        logprobs = completion_logprobs(state.base.tokenizer, tokens)
    return CompletionChoice(
        index=index,
        text=prompt_text + result.text,
        logprobs=logprobs,
        finish_reason=finish_reason(result.finish_reason),
    )


def chat_completion(
    state: AppState,
    results: list[tuple[RequestStream, GenerationResult]],
    model: str,
    prompt_tokens: int,
    completion_tokens: int,
    cached_tokens: int = 0,
) -> ChatCompletion:
    """One choice per result, in order; ``completion_tokens`` counts every sample generated."""
    tokenizer = state.base.tokenizer
    return ChatCompletion(
        id=results[0][1].request_id,
        created=int(time.time()),
        model=model,
        system_fingerprint=results[0][0].prefix_version,
        choices=[
            ChatChoice(
                index=index,
                message=AssistantMessage(content=result.text),
                logprobs=None if result.logprobs is None else chat_logprobs(tokenizer, result.logprobs),
                finish_reason=finish_reason(result.finish_reason),
            )
            for index, (_, result) in enumerate(results)
        ],
        usage=usage(prompt_tokens, completion_tokens, cached_tokens),
    )


class _ChunkFormat:
    """How one endpoint shapes its stream chunks: completions' or chat's. A chunk carries ``usage`` only
    where asked (the last one, or with ``continuous_usage_stats`` every one: that choice's so far); else
    the key is left out."""

    def __init__(
        self, state: AppState, first: RequestStream, model: str, *, chat: bool, continuous_usage: bool
    ) -> None:
        self.chat, self.continuous_usage = chat, continuous_usage
        self.tokenizer = state.base.tokenizer
        self.text_offset: dict[int, int] = {}  # per choice: characters already sent (its logprobs' offsets)
        self.common = {
            "id": first.request.request_id,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": first.prefix_version,
        }

    def opening(self, index: int, prompt_tokens: int) -> str | None:
        """Chat streams open each choice with the assistant's role and no content, as OpenAI's do."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return self._event([ChatChunkChoice(index=index, delta=delta)], usage(prompt_tokens, 0))

    def echo(self, index: int, prompt_ids: list[int], output: RequestOutput) -> str:
        """Completions' echo: the prompt first (with its logprobs when they were asked)."""
        text = self.tokenizer.decode(prompt_ids)
        logprobs = None
        if output.prompt_logprobs is not None:
            logprobs = completion_logprobs(
                self.tokenizer, list(zip(prompt_ids, output.prompt_logprobs, strict=True))
            )
        self.text_offset[index] = len(text)
        so_far = usage(output.prompt_tokens, 0, output.cached_tokens)
        choice = CompletionChoice(index=index, text=text, logprobs=logprobs, finish_reason=None)
        return self._event([choice], so_far)

    def text(self, index: int, output: RequestOutput, reason: FinishReasonName | None = None) -> str:
        so_far = usage(output.prompt_tokens, output.completion_tokens, output.cached_tokens)
        entries = output.logprobs or []
        if self.chat:
            delta = {"content": output.text} if output.text else {}
            logprobs = chat_logprobs(self.tokenizer, entries) if output.logprobs is not None else None
            choice = ChatChunkChoice(index=index, delta=delta, logprobs=logprobs, finish_reason=reason)
            return self._event([choice], so_far)
        logprobs = None
        offset = self.text_offset.get(index, 0)
        if output.logprobs is not None:
            tokens = [(entry.token_id, entry) for entry in entries]
            logprobs = completion_logprobs(self.tokenizer, tokens, text_offset=offset)
        self.text_offset[index] = offset + len(output.text)
        choice = CompletionChoice(index=index, text=output.text, logprobs=logprobs, finish_reason=reason)
        return self._event([choice], so_far)

    def usage(self, prompt_tokens: int, completion_tokens: int, cached_tokens: int) -> str:
        """The last chunk, as OpenAI sends it with ``include_usage``: no choices, the request's usage."""
        return self._event([], usage(prompt_tokens, completion_tokens, cached_tokens), final=True)

    def _event(self, choices: list[Any], info: UsageInfo, *, final: bool = False) -> str:
        chunk_type: type[BaseModel] = ChatCompletionChunk if self.chat else Completion
        chunk = chunk_type(**self.common, choices=choices, usage=info)
        shown = final or self.continuous_usage
        return sse_event(chunk.model_dump(mode="json", exclude=None if shown else {"usage"}))


async def _merged(streams: list[RequestStream]) -> AsyncIterator[tuple[int, RequestOutput]]:
    """The outputs of every stream as they come, each with its stream's index."""
    if len(streams) == 1:  # the common case: no task and no queue hop per output
        async for output in streams[0]:
            yield 0, output
        return
    queue: asyncio.Queue[tuple[int, RequestOutput]] = asyncio.Queue()

    async def pump(index: int, stream: RequestStream) -> None:
        async for output in stream:
            queue.put_nowait((index, output))

    pumps = [asyncio.ensure_future(pump(index, stream)) for index, stream in enumerate(streams)]
    try:
        for _ in range(len(streams)):  # until every stream has sent its last output
            while True:
                index, output = await queue.get()
                yield index, output
                if output.finish_reason is not None:
                    break
    finally:
        for task in pumps:
            task.cancel()


async def stream_events(
    state: AppState,
    streams: list[RequestStream],
    body: GenerationFields,
    http_request: Request,
    *,
    chat: bool,
) -> AsyncIterator[str]:
    """OpenAI's SSE over one stream per choice (``index`` = its place): a chunk per piece of text, the
    finish reason on each choice's last, the usage (if asked: all choices') once all have finished, then
    ``data: [DONE]``. A request that ends without finishing (deadline, engine error, shutdown) sends
    OpenAI's error body instead, which the official client raises as ``APIError``, and ends the others.
    If the client goes away, every stream is closed and its engine request aborted.
    """
    chunks = _ChunkFormat(state, streams[0], body.model, chat=chat, continuous_usage=body.continuous_usage)
    echoing = set(range(len(streams))) if isinstance(body, CompletionRequest) and body.echo else set()
    completion_tokens, cached = 0, [0] * len(streams)  # cached: each choice's prompt tokens found cached
    try:
        for index, stream in enumerate(streams):
            opening = chunks.opening(index, len(stream.request.prompt_ids))
            if opening is not None:
                yield opening
        async for index, output in _merged(streams):
            cached[index] = output.cached_tokens
            if index in echoing:
                yield chunks.echo(index, list(streams[index].request.prompt_ids), output)
                echoing.discard(index)
            if output.finish_reason is None:
                if output.text or output.logprobs:
                    yield chunks.text(index, output)
                continue
            if output.finish_reason not in _FINISH:
                yield sse_event(openai_error(unfinished_error(output.finish_reason))[1])
                break
            completion_tokens += output.completion_tokens
            yield chunks.text(index, output, _FINISH[output.finish_reason])
        else:
            http_request.state.completion_tokens = completion_tokens  # for the access log
            if body.include_usage:
                samples = body.samples_per_prompt
                prompt_tokens = sum(len(stream.request.prompt_ids) for stream in streams[::samples])
                yield chunks.usage(prompt_tokens, completion_tokens, sum(cached[::samples]))
        yield DONE
    finally:
        for stream in streams:
            stream.abort()  # a no-op once finished; else the client left mid-stream, or a choice failed
