"""How the engine's results become OpenAI's answers: completions and chat completions, and their SSE
chunks (text, logprobs, usage, the finish reason; echo for completions)."""

from __future__ import annotations

import time
from collections.abc import AsyncIterator
from typing import Any

from fastapi import Request
from pydantic import BaseModel

from server.api.errors import ApiError, openai_error
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
    UsageInfo,
)
from server.api.serving import UNFINISHED
from server.api.sse import DONE, sse_event
from server.api.state import AppState
from server.engine.async_engine import RequestStream
from server.engine.lifecycle import FinishReason
from server.engine.request import GenerationResult, RequestOutput

_FINISH: dict[FinishReason, FinishReasonName] = {
    FinishReason.LENGTH: "length",
    FinishReason.STOP: "stop",
    FinishReason.EOS: "stop",
}


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


def completion(
    state: AppState, stream: RequestStream, result: GenerationResult, body: GenerationFields
) -> Completion:
    prompt_ids = stream.request.prompt_ids
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    prompt_text = state.base.tokenizer.decode(prompt_ids) if echo else ""
    logprobs = None
    if result.logprobs is not None:
        tokens = [(entry.token_id, entry) for entry in result.logprobs]
        if echo and result.prompt_logprobs is not None:
            tokens = [*zip(prompt_ids, result.prompt_logprobs, strict=True), *tokens]
        logprobs = completion_logprobs(state.base.tokenizer, tokens)
    choice = CompletionChoice(
        text=prompt_text + result.text, logprobs=logprobs, finish_reason=finish_reason(result.finish_reason)
    )
    return Completion(
        id=result.request_id,
        created=int(time.time()),
        model=body.model,
        system_fingerprint=stream.prefix_version,
        choices=[choice],
        usage=usage(result.prompt_tokens, len(result.token_ids)),
    )


def chat_completion(
    state: AppState, stream: RequestStream, result: GenerationResult, model: str
) -> ChatCompletion:
    logprobs = None if result.logprobs is None else chat_logprobs(state.base.tokenizer, result.logprobs)
    return ChatCompletion(
        id=result.request_id,
        created=int(time.time()),
        model=model,
        system_fingerprint=stream.prefix_version,
        choices=[
            ChatChoice(
                message=AssistantMessage(content=result.text),
                logprobs=logprobs,
                finish_reason=finish_reason(result.finish_reason),
            )
        ],
        usage=usage(result.prompt_tokens, len(result.token_ids)),
    )


class _ChunkFormat:
    """How one endpoint shapes its stream chunks: completions' or chat's. A chunk carries ``usage`` only
    where asked (the last one, or with ``continuous_usage_stats`` every one); else the key is left out."""

    def __init__(
        self, state: AppState, stream: RequestStream, model: str, *, chat: bool, continuous_usage: bool
    ) -> None:
        self.chat, self.continuous_usage = chat, continuous_usage
        self.tokenizer = state.base.tokenizer
        self.text_offset = 0  # characters of the completion's text already sent (its logprobs' offsets)
        self.common = {
            "id": stream.request.request_id,
            "created": int(time.time()),
            "model": model,
            "system_fingerprint": stream.prefix_version,
        }

    def opening(self, prompt_tokens: int) -> str | None:
        """Chat streams open with the assistant's role and no content, as OpenAI's do."""
        if not self.chat:
            return None
        delta = {"role": "assistant", "content": ""}
        return self._event([ChatChunkChoice(delta=delta)], usage(prompt_tokens, 0))

    def echo(self, prompt_ids: list[int], output: RequestOutput) -> str:
        """Completions' echo: the prompt first (with its logprobs when they were asked)."""
        text = self.tokenizer.decode(prompt_ids)
        logprobs = None
        if output.prompt_logprobs is not None:
            logprobs = completion_logprobs(
                self.tokenizer, list(zip(prompt_ids, output.prompt_logprobs, strict=True))
            )
        self.text_offset = len(text)
        so_far = usage(output.prompt_tokens, 0)
        return self._event([CompletionChoice(text=text, logprobs=logprobs, finish_reason=None)], so_far)

    def text(self, output: RequestOutput, reason: FinishReasonName | None = None) -> str:
        so_far = usage(output.prompt_tokens, output.completion_tokens)
        entries = output.logprobs or []
        if self.chat:
            delta = {"content": output.text} if output.text else {}
            logprobs = chat_logprobs(self.tokenizer, entries) if output.logprobs is not None else None
            return self._event(
                [ChatChunkChoice(delta=delta, logprobs=logprobs, finish_reason=reason)], so_far
            )
        logprobs = None
        if output.logprobs is not None:
            tokens = [(entry.token_id, entry) for entry in entries]
            logprobs = completion_logprobs(self.tokenizer, tokens, text_offset=self.text_offset)
        self.text_offset += len(output.text)
        return self._event(
            [CompletionChoice(text=output.text, logprobs=logprobs, finish_reason=reason)], so_far
        )

    def usage(self, output: RequestOutput) -> str:
        """The last chunk, as OpenAI sends it with ``include_usage``: no choices, the usage."""
        return self._event([], usage(output.prompt_tokens, output.completion_tokens), final=True)

    def _event(self, choices: list[Any], info: UsageInfo, *, final: bool = False) -> str:
        chunk_type: type[BaseModel] = ChatCompletionChunk if self.chat else Completion
        chunk = chunk_type(**self.common, choices=choices, usage=info)
        shown = final or self.continuous_usage
        return sse_event(chunk.model_dump(mode="json", exclude=None if shown else {"usage"}))


async def stream_events(
    state: AppState, stream: RequestStream, body: GenerationFields, http_request: Request, *, chat: bool
) -> AsyncIterator[str]:
    """OpenAI's SSE: a chunk per piece of text, the finish reason on the last, the usage (if asked),
    then ``data: [DONE]``. A request that ends without finishing (deadline, engine error, shutdown)
    sends OpenAI's error body instead, which the official client raises as ``APIError``.
    If the client goes away, the stream is closed and the engine request aborted.
    """
    chunks = _ChunkFormat(state, stream, body.model, chat=chat, continuous_usage=body.continuous_usage)
    echo = isinstance(body, CompletionRequest) and bool(body.echo)
    try:
        opening = chunks.opening(len(stream.request.prompt_ids))
        if opening is not None:
            yield opening
        async for output in stream:
            if echo:
                yield chunks.echo(list(stream.request.prompt_ids), output)
                echo = False
            if output.finish_reason is None:
                if output.text or output.logprobs:
                    yield chunks.text(output)
                continue
            http_request.state.completion_tokens = output.completion_tokens  # for the access log
            if output.finish_reason not in _FINISH:
                yield sse_event(openai_error(ApiError(*UNFINISHED[output.finish_reason]))[1])
                break
            yield chunks.text(output, _FINISH[output.finish_reason])
            if body.include_usage:
                yield chunks.usage(output)
        yield DONE
    finally:
        stream.abort()  # a no-op once finished; else the client left mid-stream
