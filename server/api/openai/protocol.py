"""Wire schemas of the OpenAI-compatible endpoints, separate from the engine's dataclasses; bounds live
in the schema.

Of OpenAI's request fields, those that change nothing here (accounting, caching and storage hints of
OpenAI's platform) are accepted and ignored; those that ask for something this server cannot do
(several choices, log-probabilities, penalties, tools, structured output…) are refused with a 422 that
names them, never silently dropped; fields OpenAI does not define are refused, as on the native API.
"""

from __future__ import annotations

from typing import Annotated, Any, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field, model_validator

from server.api.schemas import Integral

MAX_PROMPT_CHARS = 200_000
_MAX_STOP = 64
_MAX_MESSAGES = 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions

FinishReasonName = Literal["stop", "length"]


class _Strict(BaseModel):
    # no unknown fields, JSON types as declared (no true-as-1, no "5"-as-5), finite numbers only
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="send a last chunk with the usage, before [DONE]")
    include_obfuscation: bool | None = Field(None, description="ignored: chunks are never obfuscated")


class GenerationFields(_Strict):
    """Fields completions and chat completions share."""

    model: str = Field(
        ...,
        min_length=1,
        max_length=256,
        description="a task id of the caller, or the base model id (no prefix)",
    )
    # at most the server's --max-new-tokens (checked by the route, written into the OpenAPI)
    max_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    temperature: float | None = Field(None, ge=0.0, le=2.0, description="default 1; 0 = greedy")
    top_p: float | None = Field(None, ge=0.0, le=1.0, description="default 1; 0 = the most likely token")
    top_k: Annotated[int, Field(ge=0, le=1_000_000), Integral] | None = Field(
        None, description="an extension (the client's extra_body); 0 = no cut"
    )
    seed: Annotated[int, Field(ge=0, le=2**63 - 1), Integral] | None = None
    stop: str | Annotated[list[str], Field(max_length=_MAX_STOP)] | None = None
    stream: bool | None = False
    stream_options: StreamOptions | None = None
    n: Annotated[int, Field(ge=1, le=128), Integral] | None = Field(None, description="only 1 is supported")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    # refused unless neutral
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: dict[str, float] | None = None

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    def unsupported(self) -> list[str]:
        """The fields set to something this server cannot honour."""
        return [
            name
            for name, refused in (
                ("n", (self.n or 1) > 1),
                ("frequency_penalty", bool(self.frequency_penalty)),
                ("presence_penalty", bool(self.presence_penalty)),
                ("logit_bias", bool(self.logit_bias)),
            )
            if refused
        ]

    @model_validator(mode="after")
    def _refuse_unsupported(self) -> GenerationFields:
        refused = self.unsupported()
        if refused:
            raise ValueError(f"not supported by this server: {', '.join(refused)}")
        return self


def _one_text_prompt(value: object) -> object:
    """A prompt is one text: a string, or a list holding one string."""
    if not isinstance(value, list):
        return value
    if any(isinstance(item, int | list) for item in value):
        raise ValueError("token-id prompts are not supported: send the prompt as text")
    if len(value) != 1:
        raise ValueError(f"send exactly one prompt; a list of {len(value)} prompts is not supported")
    return value[0]


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    prompt: Annotated[
        str, BeforeValidator(_one_text_prompt), Field(min_length=1, max_length=MAX_PROMPT_CHARS)
    ]
    echo: bool | None = None
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=128), Integral] | None = Field(
        None, description="only 1 is supported"
    )
    logprobs: Annotated[int, Field(ge=0, le=5), Integral] | None = None

    @property
    def max_new_tokens(self) -> int:
        return self.max_tokens if self.max_tokens is not None else COMPLETIONS_DEFAULT_MAX_TOKENS

    def unsupported(self) -> list[str]:
        refused = [
            name
            for name, refused in (
                ("best_of", (self.best_of or 1) > 1),
                ("echo", bool(self.echo)),
                ("suffix", bool(self.suffix)),
                ("logprobs", self.logprobs is not None),
            )
            if refused
        ]
        return super().unsupported() + refused


class ContentPart(_Strict):
    """A part of a message's content: text only."""

    type: Literal["text"]
    text: str = Field(..., max_length=MAX_PROMPT_CHARS)

    @model_validator(mode="before")
    @classmethod
    def _text_only(cls, data: Any) -> Any:
        if isinstance(data, dict) and data.get("type") != "text":
            raise ValueError(f"content parts of type {data.get('type')!r} are not supported: send text")
        return data


class ChatMessage(_Strict):
    # _plain_text_turn's rule in the schema too: only an assistant turn may come without content
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"const": "assistant"}}},
            "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )

    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=256)]
        | None
    ) = None
    name: str | None = Field(None, max_length=128)
    # what a client may echo back from an earlier assistant message; refused when it carries something
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None

    @model_validator(mode="after")
    def _plain_text_turn(self) -> ChatMessage:
        if self.content is None and self.role != "assistant":
            raise ValueError(f"a {self.role} message needs content")
        if self.tool_calls or self.function_call or self.audio:
            raise ValueError("tool calls, function calls and audio are not supported")
        return self

    @property
    def text(self) -> str:
        if self.content is None:
            return ""
        if isinstance(self.content, str):
            return self.content
        return "\n".join(part.text for part in self.content)

    def for_template(self) -> dict[str, str]:
        """The message as chat templates expect it (``developer`` is OpenAI's new name for ``system``)."""
        message = {"role": "system" if self.role == "developer" else self.role, "content": self.text}
        if self.name:
            message["name"] = self.name
        return message


class ResponseFormat(_Strict):
    type: str
    json_schema: dict[str, Any] | None = None


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``; the messages are rendered with the tokenizer's chat template."""

    messages: list[ChatMessage] = Field(..., min_length=1, max_length=_MAX_MESSAGES)
    max_completion_tokens: Annotated[int, Field(ge=1), Integral] | None = None
    # accepted and ignored: hints to OpenAI's platform
    metadata: dict[str, str] | None = None
    store: bool | None = None
    service_tier: str | None = Field(None, max_length=32)
    parallel_tool_calls: bool | None = None
    prompt_cache_key: str | None = Field(None, max_length=1024)
    prompt_cache_retention: str | None = Field(None, max_length=32)
    prompt_cache_options: dict[str, Any] | None = None
    safety_identifier: str | None = Field(None, max_length=256)
    # refused unless neutral
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), Integral] | None = None
    response_format: ResponseFormat | None = None
    tools: list[Any] | None = None
    tool_choice: str | dict[str, Any] | None = None
    functions: list[Any] | None = None
    function_call: str | dict[str, Any] | None = None
    modalities: list[str] | None = None
    audio: dict[str, Any] | None = None
    prediction: dict[str, Any] | None = None
    web_search_options: dict[str, Any] | None = None
    moderation: dict[str, Any] | None = None
    reasoning_effort: str | None = None
    verbosity: str | None = None

    @model_validator(mode="after")
    def _bounded(self) -> ChatCompletionRequest:
        if sum(len(message.text) for message in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
        both = self.max_tokens is not None and self.max_completion_tokens is not None
        if both and self.max_tokens != self.max_completion_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: send one of them")
        return self

    @property
    def max_new_tokens(self) -> int | None:
        """None: as many as the server allows."""
        return self.max_completion_tokens if self.max_completion_tokens is not None else self.max_tokens

    def unsupported(self) -> list[str]:
        no_choice = (None, "none", "auto")
        refused = [
            name
            for name, refused in (
                ("logprobs", bool(self.logprobs)),
                ("top_logprobs", bool(self.top_logprobs)),
                ("response_format", self.response_format is not None and self.response_format.type != "text"),
                ("tools", bool(self.tools)),
                ("tool_choice", self.tool_choice not in no_choice),
                ("functions", bool(self.functions)),
                ("function_call", self.function_call not in no_choice),
                ("modalities", bool(self.modalities) and self.modalities != ["text"]),
                ("audio", self.audio is not None),
                ("prediction", self.prediction is not None),
                ("web_search_options", self.web_search_options is not None),
                ("moderation", self.moderation is not None),
                ("reasoning_effort", self.reasoning_effort is not None),
                ("verbosity", self.verbosity is not None),
            )
            if refused
        ]
        return super().unsupported() + refused


# -- responses ---------------------------------------------------------------------------------


class UsageInfo(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    total_tokens: int


class CompletionChoice(BaseModel):
    index: int = 0
    text: str
    logprobs: None = None
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
    logprobs: None = None
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
    logprobs: None = None
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
