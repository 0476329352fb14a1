"""Liveness and readiness (no auth)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse
from pydantic import BaseModel

from prefix_store.errors import StoreUnavailable

router = APIRouter(tags=["health"])


class Liveness(BaseModel):
    status: str


class Readiness(BaseModel):
    status: str  # "ready", or why not: "loading", "engine loop stopped", "store unavailable"
    model: str | None = None  # the base model's id, once ready


@router.get("/healthz", response_model=Liveness, summary="Liveness")
@router.get("/health", response_model=Liveness, summary="Liveness (an alias of /healthz)")
async def healthz() -> dict[str, str]:
    """200 while the process runs."""
    return {"status": "ok"}


@router.get(
    "/readyz",
    response_model=Readiness,
    responses={503: {"model": Readiness, "description": "not ready: the model loads or the store is down"}},
)
async def readyz(request: Request) -> JSONResponse:
    state = getattr(request.app.state, "prefix_serve", None)
    if state is None:
        return JSONResponse({"status": "loading"}, status_code=503)
    if not state.engine.alive:
        return JSONResponse({"status": "engine loop stopped"}, status_code=503)
    try:
        await asyncio.to_thread(state.store.ping)
    except StoreUnavailable:
        return JSONResponse({"status": "store unavailable"}, status_code=503)
    return JSONResponse({"status": "ready", "model": state.base.model_id})
