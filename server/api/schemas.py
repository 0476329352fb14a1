"""Wire schemas of docs/API.md (pydantic), separate from the engine's dataclasses. Bounds live in the schema."""

from __future__ import annotations

from datetime import datetime
from typing import Annotated, Literal

from pydantic import BaseModel, BeforeValidator, ConfigDict, Field

from server.api.errors import error_responses


def _integral(value: object) -> object:
    """JSON Schema counts 5.0 as an integer: take it as 5 (anything else is left to strict validation)."""
    return int(value) if isinstance(value, float) and value.is_integer() else value


# For the integers of strict request models, after any bounds: true, "5" and 5.5 are refused; 5 and
# 5.0 are 5 (``Annotated[int, Field(ge=0), Integral]``: bounds first, or they leave the JSON schema).
Integral = BeforeValidator(_integral)

# docs/API.md's task id rule, for the OpenAPI document; ``prefix_store.storage.names.validate_task_id`` enforces it
# (a test holds the two together). Not a pydantic constraint: a bad task id is a 400, not a 422.
TASK_ID_PATTERN = r"^[A-Za-z0-9_-][A-Za-z0-9._-]{0,127}$"
_TASK_ID_SCHEMA = {"pattern": TASK_ID_PATTERN, "minLength": 1, "maxLength": 128}


_SSE_EVENT = {  # OpenAPI 3.1: the schema of a text/event-stream response describes each event
    "type": "object",
    "description": "one server-sent event: data is a JSON object, then [DONE] to end the stream",
    "properties": {"data": {"type": "string"}, "event": {"type": "string"}, "id": {"type": "string"}},
    "required": ["data"],
}
# what every generation route answers, for the OpenAPI (native and OpenAI alike)
GENERATION_RESPONSES: dict[int | str, dict[str, object]] = {
    200: {
        "description": 'JSON, or with "stream": true server-sent events ending with data: [DONE]',
        "content": {"text/event-stream": {"schema": _SSE_EVENT}},
    },
    **error_responses(400, 404, 413, 422, 429, 504),
}


CACHE_SALT_DESCRIPTION = (
    "only requests with the same salt (in the same tenant, on the same task version) share cached prompt "
    "blocks; unset: those without one"
)
DEFAULT_MAX_NEW_TOKENS = 64  # an unset max_new_tokens, cut to the server's cap and to what fits


class GenerateBody(BaseModel):
    # strict: JSON types as declared (no true-as-1, no "5"-as-5), so the OpenAPI types are the truth;
    # NaN and infinities (which Python's JSON reads) are not numbers here
    model_config = ConfigDict(extra="forbid", strict=True, allow_inf_nan=False)

    task_id: Annotated[str, Field(json_schema_extra=_TASK_ID_SCHEMA)] | None = Field(
        None, description="a task id of the caller; null = the base model alone"
    )
    prompt: str = Field(..., min_length=1, max_length=200_000)
    # at most the server's --max-new-tokens (checked by the request plan, written into the OpenAPI)
    max_new_tokens: Annotated[int, Integral] = Field(DEFAULT_MAX_NEW_TOKENS, ge=1)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: Annotated[int, Integral] = Field(0, ge=0, le=1_000_000)
    seed: Annotated[int, Field(ge=0, le=2**63 - 1), Integral] | None = None
    stop: list[str] = Field(default_factory=list, max_length=64)
    stream: bool = False
    cache_salt: str | None = Field(None, min_length=1, max_length=256, description=CACHE_SALT_DESCRIPTION)


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = Field(0, description="prompt tokens whose keys and values were found cached")


class GenerateResponse(BaseModel):
    id: str
    task_id: str | None
    prefix_version: str | None
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]  # deadline/error are answered as 504/500
    usage: Usage


AdapterKindField = Field(
    description="prefix: keys and values for every attention layer; soft_prompt: input embeddings before the "
    "prompt; lora: low-rank updates of the model's projections (no virtual tokens)"
)


class PrefixInfo(BaseModel):
    task_id: str
    version: str
    kind: Literal["prefix", "soft_prompt", "lora"] = AdapterKindField
    num_virtual_tokens: int
    bytes: int
    created_at: datetime = Field(description="when this version was stored: ISO 8601, UTC")
    resident: bool


class TenantUsageInfo(BaseModel):
    """What the tenant holds and may hold (current versions and their bytes; a limit of null: none)."""

    prefixes: int
    bytes: int
    max_prefixes: int | None
    max_prefix_bytes: int | None


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]
    next_cursor: str | None = Field(description="pass as cursor for the next page; null: this is the last")
    usage: TenantUsageInfo


class UploadResult(BaseModel):
    task_id: str
    version: str
    kind: Literal["prefix", "soft_prompt", "lora"] = AdapterKindField
    num_virtual_tokens: int
    bytes: int
    sha256: str
    source_format: Literal["native", "peft"]
