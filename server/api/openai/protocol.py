"""Wire schemas of the OpenAI-compatible endpoints' requests (``responses`` has the answers), separate from
the engine's dataclasses; bounds live in the schema.

Of OpenAI's request fields, those that change nothing here (accounting, caching and storage hints of
OpenAI's platform) are accepted and ignored; those that ask for something this server cannot do
(several choices, log-probabilities, penalties, tools, structured output…) are refused unless neutral
(``NEUTRAL_ONLY``: a 400 naming the field, code ``unsupported_parameter``), never silently dropped; fields
neither OpenAI nor vLLM define here are refused (code ``unknown_parameter``), as on the native API.
"""

from __future__ import annotations

from collections.abc import Callable
from typing import Annotated, Any, ClassVar, Literal

from pydantic import (
    BaseModel,
    BeforeValidator,
    ConfigDict,
    Field,
    ValidationInfo,
    field_validator,
    model_validator,
)
from pydantic_core import PydanticCustomError

from server.api.schemas import Integral

MAX_PROMPT_CHARS = 200_000
_MAX_STOP = 64
_MAX_MESSAGES = 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
# chat's unset max_tokens ("as many as fit") where the server sets no --max-new-tokens: a row reserves its
# max_tokens in the batch, so the whole context for each would cut how many requests run at once
CHAT_DEFAULT_MAX_TOKENS = 1024


def _falsy(value: Any) -> bool:
    return not value


def _unset(value: Any) -> bool:
    return value is None


def _one(value: Any) -> bool:
    return value in (None, 1)


def _no_choice(value: Any) -> bool:
    return value in (None, "none", "auto")


class _Strict(BaseModel):
    # no unknown fields, JSON types as declared (no true-as-1, no "5"-as-5), finite numbers only
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    # fields this server accepts only with a value that asks for nothing it cannot do: name -> that test
    NEUTRAL_ONLY: ClassVar[dict[str, Callable[[Any], bool]]] = {}

    @field_validator("*")
    @classmethod
    def _refuse_unsupported(cls, value: Any, info: ValidationInfo) -> Any:
        neutral = cls.NEUTRAL_ONLY.get(info.field_name or "")
        if neutral is not None and not neutral(value):
            raise PydanticCustomError("unsupported_parameter", "not supported by this server")
        return value


class StreamOptions(_Strict):
    include_usage: bool | None = Field(None, description="send a last chunk with the usage, before [DONE]")
    continuous_usage_stats: bool | None = Field(
        None, description="a vLLM extension: with include_usage, the usage so far in every chunk too"
    )
    include_obfuscation: bool | None = Field(None, description="ignored: chunks are never obfuscated")


class GenerationFields(_Strict):
    """Fields completions and chat completions share."""

    PROMPT_FIELD: ClassVar[str]  # the field holding the prompt, as errors name it
    # an unset max_tokens: that many tokens (cut to what fits), None: as many as fit
    UNSET_MAX_TOKENS: ClassVar[int | None]
    NEUTRAL_ONLY = {"n": _one}

    model: str = Field(
        ...,
        min_length=1,
        max_length=256,
        description="a task id of the caller, or the base model id (no prefix)",
    )
    # at most what the model's context leaves after prefix + prompt, and the server's --max-new-tokens
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
    ignore_eos: bool | None = Field(
        None, description="a vLLM extension (the client's extra_body): generate past end-of-sequence tokens"
    )
    n: Annotated[int, Field(ge=1, le=128), Integral] | None = Field(None, description="only 1 is supported")
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    frequency_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    presence_penalty: float | None = Field(None, ge=-2.0, le=2.0)
    logit_bias: (
        Annotated[dict[str, Annotated[float, Field(ge=-100, le=100)]], Field(max_length=1024)] | None
    ) = None
    # vLLM's extensions (the client's extra_body)
    repetition_penalty: float | None = Field(None, gt=0.0, le=10.0, description="1 = none")
    min_tokens: Annotated[int, Field(ge=0), Integral] | None = Field(
        None, description="no end-of-sequence or stop token before this many"
    )
    stop_token_ids: (
        Annotated[list[Annotated[int, Field(ge=0), Integral]], Field(max_length=_MAX_STOP)] | None
    ) = None

    @property
    def stop_sequences(self) -> list[str]:
        if self.stop is None:
            return []
        return [self.stop] if isinstance(self.stop, str) else list(self.stop)

    @property
    def include_usage(self) -> bool:
        return bool(self.stream_options and self.stream_options.include_usage)

    @property
    def continuous_usage(self) -> bool:
        """The usage in every chunk (vLLM: only with ``include_usage``)."""
        return self.include_usage and bool(self.stream_options and self.stream_options.continuous_usage_stats)

    @property
    def asked_max_tokens(self) -> tuple[int | None, str]:
        """The new tokens the caller asked for (None: unset) and the field that said so."""
        return self.max_tokens, "max_tokens"

    @field_validator("logit_bias")
    @classmethod
    def _token_id_keys(cls, value: dict[str, float] | None) -> dict[str, float] | None:
        if value is not None and not all(token.isdigit() for token in value):
            raise ValueError("logit_bias keys are token ids (as strings)")
        return value

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias); its keys are token ids as strings (OpenAI's wire format)."""
        return tuple((int(token), value) for token, value in (self.logit_bias or {}).items())


def _one_prompt(value: object) -> object:
    """A prompt is one text or one list of token ids: a string, a list of ints, or a list holding one of
    those (several prompts in one request are not supported yet)."""
    if not isinstance(value, list) or all(isinstance(item, int) for item in value):
        return value
    if len(value) != 1:
        raise ValueError(f"send exactly one prompt; a list of {len(value)} prompts is not supported")
    return value[0]


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    PROMPT_FIELD = "prompt"
    UNSET_MAX_TOKENS = COMPLETIONS_DEFAULT_MAX_TOKENS
    NEUTRAL_ONLY = {**GenerationFields.NEUTRAL_ONLY, "best_of": _one, "suffix": _falsy}

    prompt: Annotated[
        Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
        | Annotated[
            list[Annotated[int, Field(ge=0), Integral]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)
        ],
        BeforeValidator(_one_prompt),
    ]
    # 0 is allowed here (with echo: score the prompt only, as lm-eval does)
    max_tokens: Annotated[int, Field(ge=0), Integral] | None = None
    echo: bool | None = Field(None, description="the prompt before the completion (with logprobs: theirs)")
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=128), Integral] | None = Field(
        None, description="only 1 is supported"
    )
    logprobs: Annotated[int, Field(ge=0, le=20), Integral] | None = Field(
        None, description="each token's logprob and this many alternatives"
    )


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
    # _content_unless_assistant's rule in the schema too: only an assistant turn may come without content
    model_config = ConfigDict(
        json_schema_extra={
            "if": {"properties": {"role": {"const": "assistant"}}},
            "else": {"required": ["content"], "properties": {"content": {"not": {"type": "null"}}}},
        }
    )
    # what a client may echo back from an earlier assistant message; refused when it carries something
    NEUTRAL_ONLY = {"tool_calls": _falsy, "function_call": _falsy, "audio": _falsy}

    role: Literal["system", "developer", "user", "assistant"]
    content: (
        Annotated[str, Field(max_length=MAX_PROMPT_CHARS)]
        | Annotated[list[ContentPart], Field(max_length=256)]
        | None
    ) = Field(None, validate_default=True)
    name: str | None = Field(None, max_length=128)
    refusal: str | None = None
    tool_calls: list[Any] | None = None
    function_call: Any = None
    audio: Any = None
    annotations: list[Any] | None = None

    @field_validator("content")
    @classmethod
    def _content_unless_assistant(cls, value: Any, info: ValidationInfo) -> Any:
        role = info.data.get("role")
        if value is None and role not in (None, "assistant"):
            raise ValueError(f"a {role} message needs content")
        return value

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


class JsonSchemaFormat(_Strict):
    name: str = Field(..., min_length=1, max_length=64)
    description: str | None = Field(None, max_length=4096)
    schema_: dict[str, Any] | None = Field(None, alias="schema")  # None: any JSON object
    strict: bool | None = None


class ResponseFormat(_Strict):
    """``text`` (no constraint), ``json_object`` (a JSON object) or ``json_schema`` (a document that
    validates against the schema), as OpenAI defines them."""

    type: Literal["text", "json_object", "json_schema"]
    json_schema: JsonSchemaFormat | None = None

    @model_validator(mode="after")
    def _schema_when_asked(self) -> ResponseFormat:
        if (self.type == "json_schema") != (self.json_schema is not None):
            raise ValueError("json_schema is required with type json_schema, and only then")
        return self

    @property
    def constraint(self) -> dict[str, Any] | None:
        """The JSON schema the reply must follow; None: no constraint."""
        if self.type == "text":
            return None
        if self.json_schema is not None and self.json_schema.schema_ is not None:
            return self.json_schema.schema_
        return {"type": "object"}


class ChatCompletionRequest(GenerationFields):
    """``POST /v1/chat/completions``; the messages are rendered with the tokenizer's chat template."""

    PROMPT_FIELD = "messages"
    UNSET_MAX_TOKENS = None
    NEUTRAL_ONLY = {
        **GenerationFields.NEUTRAL_ONLY,
        "tools": _falsy,
        "tool_choice": _no_choice,
        "functions": _falsy,
        "function_call": _no_choice,
        "modalities": lambda value: not value or value == ["text"],
        **dict.fromkeys(
            (
                "audio",
                "prediction",
                "web_search_options",
                "moderation",
                "reasoning_effort",
                "verbosity",
            ),
            _unset,
        ),
    }

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
    logprobs: bool | None = None
    top_logprobs: Annotated[int, Field(ge=0, le=20), Integral] | None = None
    response_format: ResponseFormat | None = None
    # refused unless neutral
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

    @field_validator("messages")
    @classmethod
    def _bounded(cls, messages: list[ChatMessage]) -> list[ChatMessage]:
        if sum(len(message.text) for message in messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
        return messages

    @field_validator("max_completion_tokens")
    @classmethod
    def _one_max(cls, value: int | None, info: ValidationInfo) -> int | None:
        max_tokens = info.data.get("max_tokens")
        if None not in (value, max_tokens) and value != max_tokens:
            raise ValueError("max_tokens and max_completion_tokens differ: send one of them")
        return value

    @property
    def asked_max_tokens(self) -> tuple[int | None, str]:
        if self.max_completion_tokens is not None:
            return self.max_completion_tokens, "max_completion_tokens"
        return self.max_tokens, "max_tokens"
