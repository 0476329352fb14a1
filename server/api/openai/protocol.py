"""Wire schemas of the OpenAI-compatible endpoints' requests (``responses`` has the answers), separate from
the engine's dataclasses; bounds live in the schema.

Of OpenAI's request fields, those that change nothing here (accounting, caching and storage hints of
OpenAI's platform) are accepted and ignored; those that ask for something this server cannot do (tools,
audio, a completion's suffix…) are refused unless neutral
(``NEUTRAL_ONLY``: a 400 naming the field, code ``unsupported_parameter``), never silently dropped; fields
neither OpenAI nor vLLM define here are refused (code ``unknown_parameter``), as on the native API.
"""

from __future__ import annotations

import inspect
import re
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
from transformers import PreTrainedTokenizerBase

from server.api.schemas import CACHE_SALT_DESCRIPTION, Integral

MAX_PROMPT_CHARS = 200_000
MAX_PROMPTS = 64  # prompts in one completions request
MAX_SAMPLES = 128  # engine requests one request may start: prompts × (best_of or n)
_MAX_STOP = 64
_MAX_MESSAGES = 1024
COMPLETIONS_DEFAULT_MAX_TOKENS = 16  # OpenAI's default for /v1/completions
_TOKEN_ID_KEY = re.compile(r"[0-9]{1,10}")  # a token id written as a JSON object key


def _falsy(value: Any) -> bool:
    return not value


def _unset(value: Any) -> bool:
    return value is None


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
    # an unset max_tokens: that many tokens (cut to what fits), None: as many as fit (``plan.NewTokens``)
    UNSET_MAX_TOKENS: ClassVar[int | None]

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
    n: Annotated[int, Field(ge=1, le=MAX_SAMPLES), Integral] | None = Field(
        None, description="choices per prompt: independent samples (with a seed, sample i uses seed + i)"
    )
    user: str | None = Field(None, max_length=256, description="accepted and ignored")
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description=CACHE_SALT_DESCRIPTION)
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
    def choices_per_prompt(self) -> int:
        return self.n or 1

    @property
    def samples_per_prompt(self) -> int:
        """Engine requests per prompt (``best_of`` where the route has it, else ``n``)."""
        return self.choices_per_prompt

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
        # ASCII digits only: str.isdigit() takes "³" and "١٢", and int() then fails or reads another number
        if value is not None and not all(_TOKEN_ID_KEY.fullmatch(token) for token in value):
            raise ValueError("logit_bias keys are token ids: 1 to 10 ASCII digits (as strings)")
        return value

    @property
    def bias(self) -> tuple[tuple[int, float], ...]:
        """``logit_bias`` as (token id, bias); its keys are token ids as strings (OpenAI's wire format)."""
        return tuple((int(token), value) for token, value in (self.logit_bias or {}).items())


_Text = Annotated[str, Field(min_length=1, max_length=MAX_PROMPT_CHARS)]
_TokenIds = Annotated[
    list[Annotated[int, Field(ge=0), Integral]], Field(min_length=1, max_length=MAX_PROMPT_CHARS)
]


def _prompt_shape(value: object) -> object:
    """Clear errors for the shapes of a prompt list (the union's own errors would list every branch)."""
    if not isinstance(value, list) or all(isinstance(item, int) for item in value):
        if value == []:
            raise ValueError("send at least one prompt")
        return value
    if len(value) > MAX_PROMPTS:
        raise ValueError(f"send at most {MAX_PROMPTS} prompts per request, not {len(value)}")
    if not (all(isinstance(item, str) for item in value) or all(isinstance(item, list) for item in value)):
        raise ValueError("a list of prompts holds texts or lists of token ids, not both")
    return value


def _each_prompt(prompt: str | list[int] | list[str] | list[list[int]]) -> list[str | list[int]]:
    """A valid ``prompt`` field as its prompts (one text or token-id list, or each of a list of them)."""
    if isinstance(prompt, str) or isinstance(prompt[0], int):
        return [prompt]  # type: ignore[list-item]
    return list(prompt)  # type: ignore[arg-type]


class CompletionRequest(GenerationFields):
    """``POST /v1/completions``."""

    PROMPT_FIELD = "prompt"
    UNSET_MAX_TOKENS = COMPLETIONS_DEFAULT_MAX_TOKENS
    NEUTRAL_ONLY = {**GenerationFields.NEUTRAL_ONLY, "suffix": _falsy}

    # a text, token ids, or a list of either (one choice per prompt and sample)
    prompt: Annotated[
        _Text
        | _TokenIds
        | Annotated[list[_Text], Field(max_length=MAX_PROMPTS)]
        | Annotated[list[_TokenIds], Field(max_length=MAX_PROMPTS)],
        BeforeValidator(_prompt_shape),
    ]
    # 0 is allowed here (with echo: score the prompt only, as lm-eval does)
    max_tokens: Annotated[int, Field(ge=0), Integral] | None = None
    echo: bool | None = Field(None, description="the prompt before the completion (with logprobs: theirs)")
    suffix: str | None = None
    best_of: Annotated[int, Field(ge=1, le=MAX_SAMPLES), Integral] | None = Field(
        None,
        validate_default=True,  # its validator bounds the samples of every request
        description="samples per prompt, of which the n with the highest total logprob are returned",
    )
    logprobs: Annotated[int, Field(ge=0, le=20), Integral] | None = Field(
        None, description="each token's logprob and this many alternatives"
    )

    @field_validator("best_of")
    @classmethod
    def _samples_bounded(cls, value: int | None, info: ValidationInfo) -> int | None:
        n, prompt = info.data.get("n") or 1, info.data.get("prompt")
        if value is not None and value < n:
            raise ValueError(f"best_of ({value}) must be at least n ({n})")
        if value not in (None, n) and info.data.get("stream"):
            raise ValueError("best_of cannot be streamed (it picks among finished samples)")
        prompts = 1 if prompt is None else len(_each_prompt(prompt))
        if prompts * (value or n) > MAX_SAMPLES:
            raise ValueError(f"prompts × samples per prompt (best_of or n) must be at most {MAX_SAMPLES}")
        return value

    @property
    def prompts(self) -> list[str | list[int]]:
        """Each prompt of the request: a text or token ids."""
        return _each_prompt(self.prompt)

    @property
    def samples_per_prompt(self) -> int:
        return self.best_of or self.choices_per_prompt


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


# what a chat template sees that is not the request's to set: the messages, and the arguments of the
# tokenizer's ``apply_chat_template`` (they are its own, not the template's)
TEMPLATE_ARGUMENTS = frozenset(inspect.signature(PreTrainedTokenizerBase.apply_chat_template).parameters) | {
    "messages",
    "conversation",
    "bos_token",
    "eos_token",
}


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
    chat_template_kwargs: Annotated[dict[str, Any], Field(max_length=32)] | None = Field(
        None, description="a vLLM extension: more variables for the chat template (e.g. enable_thinking)"
    )
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

    @field_validator("chat_template_kwargs")
    @classmethod
    def _template_variables(cls, value: dict[str, Any] | None) -> dict[str, Any] | None:
        taken = [key for key in value or {} if key in TEMPLATE_ARGUMENTS or not key.isidentifier()]
        if taken:
            raise ValueError(
                f"not a chat template variable this server lets a request set: {taken[0][:64]!r}"
            )
        return value

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
