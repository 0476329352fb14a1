"""The heavy objects the app holds, built once in the lifespan and reached through dependencies."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from prefix_store import PrefixLimits
from prefix_store.registry import PrefixRegistry
from prefix_store.store import PrefixStore
from server.config import ServeSettings
from server.engine.async_engine import AsyncEngine
from server.engine.base_model import BaseModel


@dataclass
class AppState:
    settings: ServeSettings
    base: BaseModel
    store: PrefixStore
    registry: PrefixRegistry
    engine: AsyncEngine
    limits: PrefixLimits


@dataclass(frozen=True)
class Caller:
    """Who is calling: the tenant their key belongs to and its role."""

    tenant: str
    role: str  # "user" or "admin"


def app_state(request: Request) -> AppState:
    return request.app.state.prefix_serve


def caller(request: Request) -> Caller:
    """Auth is off in this build: one tenant, ``default``, with the admin role."""
    return Caller(tenant="default", role="admin")


StateDep = Annotated[AppState, Depends(app_state)]
CallerDep = Annotated[Caller, Depends(caller)]
