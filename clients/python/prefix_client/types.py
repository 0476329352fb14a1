"""Typed results of the SDK (pydantic models of docs/API.md's response bodies).

Unknown fields the server may add later are kept (``extra="allow"``), so a newer server never breaks
an older client.
"""

from __future__ import annotations

from datetime import UTC, datetime

from pydantic import BaseModel, ConfigDict, field_validator

__all__ = ["Generation", "Health", "PrefixInfo", "StreamEnd", "TokenEvent", "UploadResult", "Usage"]


class _Result(BaseModel):
    model_config = ConfigDict(extra="allow", frozen=True)


class Usage(_Result):
    prompt_tokens: int
    completion_tokens: int
    cached_tokens: int = 0  # of the prompt tokens, those the server found cached (servers before: 0)


class Generation(_Result):
    """A finished generation (``POST /v1/generate``)."""

    id: str
    task_id: str | None  # None: the base model alone
    prefix_version: str | None  # the version of the task's prefix that produced this text
    text: str
    token_ids: list[int]
    finish_reason: str  # "length", "stop" or "eos"
    usage: Usage


class TokenEvent(_Result):
    """One generated token of a stream. ``text`` is the new text it completes (it may be empty while a
    multi-byte character is still incomplete, and then hold the whole character on a later token)."""

    token_id: int
    text: str


class StreamEnd(_Result):
    """The last event of a stream: how it finished and what it used."""

    id: str
    task_id: str | None
    prefix_version: str | None
    finish_reason: str  # "length", "stop", "eos"; "deadline" or "error" when the server ended it
    usage: Usage


class PrefixInfo(_Result):
    """One of the tenant's prefixes (``GET /v1/admin/prefixes[/{task_id}]``)."""

    task_id: str
    version: str
    num_virtual_tokens: int
    kind: str = "prefix"  # "prefix" or "soft_prompt" (servers before soft prompts send none)
    bytes: int
    created_at: datetime  # timezone-aware (UTC); sent as ISO 8601 text
    resident: bool  # held in the device cache of the replica that answered

    @field_validator("created_at")
    @classmethod
    def _utc(cls, value: datetime) -> datetime:
        """A time without a zone is UTC (the server sends one with ``Z``; older ones sent epoch seconds)."""
        return value.replace(tzinfo=UTC) if value.tzinfo is None else value.astimezone(UTC)


class TenantUsage(_Result):
    """What the tenant holds and may hold: its tasks and their bytes (a limit of None: none)."""

    prefixes: int
    bytes: int
    max_prefixes: int | None = None
    max_prefix_bytes: int | None = None


class PrefixPage(_Result):
    """One page of the tenant's prefixes, by task id (``GET /v1/admin/prefixes?limit=&cursor=``)."""

    prefixes: list[PrefixInfo]
    next_cursor: str | None = None  # pass as ``cursor`` for the next page; None: this was the last
    usage: TenantUsage | None = None  # servers before paging send none


class UploadResult(_Result):
    """What an upload stored (``PUT /v1/admin/prefixes/{task_id}``); ``created`` is False for a replace."""

    task_id: str
    version: str
    num_virtual_tokens: int
    kind: str = "prefix"  # "prefix" or "soft_prompt"
    bytes: int
    sha256: str
    source_format: str  # "native" or "peft": the format it was uploaded in
    created: bool = True


class Health(_Result):
    """The server's readiness (``GET /readyz``): ``ready`` is False while loading, stopping or while its
    prefix store is unreachable; ``status`` says which."""

    ready: bool
    status: str
    model: str | None = None
