"""Wire schemas of API.md (pydantic), separate from the engine's dataclasses. Bounds live in the schema."""

from __future__ import annotations

from typing import Literal

from pydantic import BaseModel, ConfigDict, Field


class GenerateBody(BaseModel):
    model_config = ConfigDict(extra="forbid")

    task_id: str | None = Field(None, description="a task id of the caller; null = the base model alone")
    prompt: str = Field(..., min_length=1, max_length=200_000)
    max_new_tokens: int = Field(64, ge=1, le=65_536)
    temperature: float = Field(0.0, ge=0.0, le=100.0)
    top_p: float = Field(1.0, gt=0.0, le=1.0)
    top_k: int = Field(0, ge=0, le=1_000_000)
    seed: int | None = Field(None, ge=0, le=2**63 - 1)
    stop: list[str] = Field(default_factory=list, max_length=64)
    stream: bool = False


class Usage(BaseModel):
    prompt_tokens: int
    completion_tokens: int


class GenerateResponse(BaseModel):
    id: str
    task_id: str | None
    prefix_version: str | None
    text: str
    token_ids: list[int]
    finish_reason: Literal["length", "stop", "eos"]  # deadline/error are answered as 504/500
    usage: Usage


class PrefixInfo(BaseModel):
    task_id: str
    version: str
    num_virtual_tokens: int
    bytes: int
    created_at: float
    resident: bool


class PrefixList(BaseModel):
    prefixes: list[PrefixInfo]


class UploadResult(BaseModel):
    task_id: str
    version: str
    num_virtual_tokens: int
    bytes: int
    sha256: str
    source_format: Literal["native", "peft"]
