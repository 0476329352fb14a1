"""Liveness and readiness (no auth)."""

from __future__ import annotations

import asyncio

from fastapi import APIRouter, Request
from fastapi.responses import JSONResponse

from prefix_store.store import StoreUnavailable

router = APIRouter(tags=["health"])


@router.get("/healthz")
async def healthz() -> dict[str, str]:
    return {"status": "ok"}


@router.get("/readyz")
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
