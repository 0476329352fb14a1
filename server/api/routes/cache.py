"""``/v1/admin/cache``: the caller tenant's cached prompt blocks: how many, and a reset that drops them."""

from __future__ import annotations

from fastapi import APIRouter, Depends
from pydantic import BaseModel, Field

from server.api.errors import error_responses
from server.api.state import CallerDep, StateDep, require_admin

router = APIRouter(
    prefix="/v1/admin/cache",
    tags=["admin"],
    dependencies=[Depends(require_admin)],
    responses=error_responses(401, 403, 503),
)


class CacheView(BaseModel):
    prompt_cache: bool = Field(
        description="whether the server caches prompt blocks (PREFIX_SERVE_PROMPT_CACHE)"
    )
    block_size: int = Field(description="tokens per KV block: prompts are cached a full block at a time")
    blocks: int = Field(description="the tenant's named blocks: held by its running requests, or cached")


class CacheReset(BaseModel):
    dropped_blocks: int = Field(description="the tenant's blocks no later request will find cached")


@router.get("", response_model=CacheView)
async def cache_view(state: StateDep, who: CallerDep) -> CacheView:
    engine = state.engine
    return CacheView(
        prompt_cache=state.settings.prompt_cache,
        block_size=engine.stats().kv.block_size,
        blocks=await engine.cached_blocks(who.tenant),
    )


@router.post("/reset", response_model=CacheReset)
async def reset_cache(state: StateDep, who: CallerDep) -> CacheReset:
    """Drop the caller tenant's cached prompt blocks (vLLM's ``/reset_prefix_cache``, for one tenant):
    requests after it compute their prompts again; running ones are not disturbed."""
    return CacheReset(dropped_blocks=await state.engine.forget_cached(who.tenant))
