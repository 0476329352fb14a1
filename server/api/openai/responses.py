"""Wire schemas of the OpenAI-compatible endpoints' responses: completions, chat completions, their stream
chunks, their logprobs, and the model list."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, Field

FinishReasonName = Literal["stop", "length"]


class CompletionLogprobs(BaseModel):
    """A completion's logprobs (OpenAI's legacy shape): per token of ``text``, its string, logprob (None for
    an echoed prompt's first token), ``top`` alternatives by their strings, and its offset in ``text``."""

    tokens: list[str]
    token_logprobs: list[float | None]
    top_logprobs: list[dict[str, float] | None]
    text_offset: list[int]


class TopLogprob(BaseModel):
    token: str
    logprob: float
    bytes: list[int] | None


class ChatTokenLogprob(TopLogprob):
    top_logprobs: list[TopLogprob]


class ChatLogprobs(BaseModel):
    content: list[ChatTokenLogprob] | None


class PromptTokensDetails(BaseModel):
    cached_tokens: int = Field(0, description="prompt tokens whose keys and values were found cached")


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int
    prompt_tokens_details: PromptTokensDetails | None = None


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: CompletionLogprobs | None = None
    finish_reason: FinishReasonName | None


class Completion(BaseModel):
    """A completion, and also each chunk of a streamed one (with ``finish_reason`` null until the last)."""

    id: str
    object: Literal["text_completion"] = "text_completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(None, description="the prefix version that served the request")
    choices: list[CompletionChoice]
    usage: UsageInfo | None = None


class AssistantMessage(BaseModel):
    role: Literal["assistant"] = "assistant"
    content: str


class ChatChoice(BaseModel):
    index: int = 0
    message: AssistantMessage
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName


class ChatCompletion(BaseModel):
    id: str
    object: Literal["chat.completion"] = "chat.completion"
    created: int
    model: str
    system_fingerprint: str | None = Field(None, description="the prefix version that served the request")
    choices: list[ChatChoice]
    usage: UsageInfo


class ChatChunkChoice(BaseModel):
    index: int = 0
    delta: dict[str, str]  # {"role": "assistant"} first, then {"content": …}; {} on the last
    logprobs: ChatLogprobs | None = None
    finish_reason: FinishReasonName | None = None


class ChatCompletionChunk(BaseModel):
    id: str
    object: Literal["chat.completion.chunk"] = "chat.completion.chunk"
    created: int
    model: str
    system_fingerprint: str | None = None
    choices: list[ChatChunkChoice]
    usage: UsageInfo | None = None


class ModelCard(BaseModel):
    id: str
    object: Literal["model"] = "model"
    created: int
    owned_by: str
    parent: str | None = Field(None, description="for a task: the base model its prefix runs on")


class ModelList(BaseModel):
    object: Literal["list"] = "list"
    data: list[ModelCard]
