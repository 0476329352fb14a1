"""vLLM's tokenizer routes at the root, as lm-eval's remote tokenizer calls them: ``GET /tokenizer_info``,
``POST /tokenize`` (a prompt, or chat messages rendered as ``/v1/chat/completions`` renders them) and
``POST /detokenize``. Tokenization is the base model's whatever the task; ``model`` (optional, as in
vLLM) is checked only so that a name the caller cannot use is a 404 here too."""

from __future__ import annotations

from typing import Annotated

from fastapi import APIRouter, Depends
from pydantic import BaseModel, ConfigDict, Field, model_validator

from prefix_store.storage.excerpt import excerpt_int
from server.api.errors import ApiError, error_responses
from server.api.openai import translation
from server.api.openai.protocol import MAX_PROMPT_CHARS, ChatMessage
from server.api.schemas import Integral
from server.api.state import AppState, Caller, CallerDep, StateDep, caller

_MAX_MESSAGES = 1024  # as /v1/chat/completions
_MAX_TOKEN_IDS = MAX_PROMPT_CHARS  # of one /detokenize: no more ids than a prompt may have characters

router = APIRouter(tags=["tokenizer"], dependencies=[Depends(caller)], responses=error_responses(401, 503))


class _Strict(BaseModel):
    # no unknown fields, JSON types as declared (no true-as-1, no "5"-as-5)
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)


_Model = Annotated[
    str | None,
    Field(
        min_length=1,
        max_length=256,
        description="a task id of the caller or the base model id; unset: the base model",
    ),
]


class TokenizeRequest(_Strict):
    """``POST /tokenize``: ``prompt`` or ``messages``, as vLLM's two request forms."""

    model_config = ConfigDict(
        json_schema_extra={
            "oneOf": [
                {"required": ["prompt"], "not": {"required": ["messages"]}},
                {"required": ["messages"], "not": {"required": ["prompt"]}},
            ]
        }
    )

    model: _Model = None
    prompt: str | None = Field(None, max_length=MAX_PROMPT_CHARS, description="a text to tokenize")
    messages: list[ChatMessage] | None = Field(
        None,
        min_length=1,
        max_length=_MAX_MESSAGES,
        description="chat messages, rendered with the model's chat template and its generation prompt",
    )
    add_special_tokens: bool | None = Field(
        None,
        description="add the tokenizer's special tokens (e.g. BOS); unset: true for a prompt, "
        "false for messages (the chat template holds its own)",
    )
    return_token_strs: bool = Field(False, description="also answer the tokens' strings")

    @model_validator(mode="after")
    def _one_form(self) -> TokenizeRequest:
        given = {"prompt", "messages"} & self.model_fields_set
        if len(given) != 1 or getattr(self, given.pop()) is None:
            raise ValueError("send exactly one of prompt (a string) or messages (a list)")
        if self.messages is not None and sum(len(m.text) for m in self.messages) > MAX_PROMPT_CHARS:
            raise ValueError(f"the messages hold more than {MAX_PROMPT_CHARS} characters")
        return self


class TokenizeResponse(BaseModel):
    tokens: list[int]
    count: int = Field(description="len(tokens)")
    max_model_len: int = Field(description="the most tokens a prompt and its completion may hold together")
    token_strs: list[str] | None = Field(None, description="with return_token_strs: each token's string")


class DetokenizeRequest(_Strict):
    model: _Model = None
    tokens: list[Annotated[int, Field(ge=0), Integral]] = Field(..., max_length=_MAX_TOKEN_IDS)


class DetokenizeResponse(BaseModel):
    prompt: str


class TokenizerInfo(BaseModel):
    """vLLM's ``/tokenizer_info``: the tokenizer's configuration under ``tokenizer_config.json``'s names."""

    tokenizer_class: str
    bos_token: str | None
    eos_token: str | None
    pad_token: str | None
    unk_token: str | None
    chat_template: str | None = Field(description="the Jinja template /v1/chat/completions renders")


@router.get("/tokenizer_info", response_model=TokenizerInfo)
async def tokenizer_info(state: StateDep) -> TokenizerInfo:
    """The base model's tokenizer: its class, special tokens and chat template."""
    tokenizer = state.base.tokenizer
    template = getattr(tokenizer, "chat_template", None)
    if isinstance(template, dict):  # several named templates: the one applied by default
        template = template.get("default")
    return TokenizerInfo(
        tokenizer_class=type(tokenizer).__name__,
        bos_token=tokenizer.bos_token,
        eos_token=tokenizer.eos_token,
        pad_token=tokenizer.pad_token,
        unk_token=tokenizer.unk_token,
        chat_template=template,
    )


@router.post("/tokenize", response_model=TokenizeResponse, responses=error_responses(400, 404, 413, 422))
async def tokenize(body: TokenizeRequest, state: StateDep, who: CallerDep) -> TokenizeResponse:
    """The token ids of ``prompt``, or of ``messages`` rendered with the chat template."""
    await _check_model(state, who, body.model)
    if body.messages is not None:
        text, special = translation.render_chat(state.base, body.messages), False
    else:
        text, special = body.prompt or "", True  # vLLM's defaults
    if body.add_special_tokens is not None:
        special = body.add_special_tokens
    tokenizer = state.base.tokenizer
    ids: list[int] = tokenizer(text, add_special_tokens=special).input_ids
    return TokenizeResponse(
        tokens=ids,
        count=len(ids),
        max_model_len=max_model_len(state),
        token_strs=tokenizer.convert_ids_to_tokens(ids) if body.return_token_strs else None,
    )


@router.post("/detokenize", response_model=DetokenizeResponse, responses=error_responses(400, 404, 413, 422))
async def detokenize(body: DetokenizeRequest, state: StateDep, who: CallerDep) -> DetokenizeResponse:
    """The text of ``tokens`` (ids of the vocabulary, else 400)."""
    await _check_model(state, who, body.model)
    vocabulary = len(state.base.tokenizer)
    outside = next((token for token in body.tokens if token >= vocabulary), None)
    if outside is not None:
        raise ApiError(
            400,
            "invalid_request",
            f"token id {excerpt_int(outside)} is not in the vocabulary (ids 0 to {vocabulary - 1})",
        )
    return DetokenizeResponse(prompt=state.base.tokenizer.decode(body.tokens))


def max_model_len(state: AppState) -> int:
    """vLLM's ``max_model_len``: the model's positions, within the server's prompt and new-token limits
    where it sets one (without any, the batch's token budget bounds a request)."""
    settings = state.settings
    limits = [state.base.max_positions]
    if settings.max_new_tokens is not None:
        limits.append(settings.max_prompt_tokens + settings.max_new_tokens)
    known = [limit for limit in limits if limit is not None]
    return min(known) if known else settings.max_batch_tokens


async def _check_model(state: AppState, who: Caller, model: str | None) -> None:
    """404 unless ``model`` is unset, the base model or a task of the caller (as ``/v1/models/{model}``)."""
    if model is not None:
        await translation.get_model(state, who, model)
