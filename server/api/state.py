"""The heavy objects the app holds, built once in the lifespan, and the dependencies that reach them."""

from __future__ import annotations

from dataclasses import dataclass
from typing import Annotated

from fastapi import Depends, Request

from prefix_store.cache.registry import PrefixRegistry
from prefix_store.storage.store import PrefixStore
from server.api.auth import AuthConfig, Caller, Role, bearer_token
from server.api.errors import ApiError
from server.api.metrics import ServerMetrics
from server.api.tenancy import TenantGate
from server.config import ServeSettings
from server.engine.async_engine import AsyncEngine
from server.engine.base_model import BaseModel
from server.engine.grammar import GrammarCompiler
from server.engine.startup import RunningEngine


@dataclass
class AppState:
    settings: ServeSettings
    base: BaseModel
    store: PrefixStore
    running: RunningEngine  # the engine and the prefix registry it pins in
    auth: AuthConfig
    gate: TenantGate
    metrics: ServerMetrics | None = None  # the app's metrics (install_metrics); None: not recorded
    grammars: GrammarCompiler | None = None  # structured output's schemas → grammars (built on first use)

    @property
    def engine(self) -> AsyncEngine:
        return self.running.engine

    @property
    def registry(self) -> PrefixRegistry:
        return self.running.registry


def app_state(request: Request) -> AppState:
    state = getattr(request.app.state, "prefix_serve", None)
    if state is None:
        raise ApiError(503, "unavailable", "the server is starting")
    return state


def caller(request: Request) -> Caller:
    """Authenticate the ``Authorization: Bearer`` key (401 when missing or unknown)."""
    found = app_state(request).auth.authenticate(bearer_token(request.headers.get("authorization")))
    if found is None:
        raise ApiError(
            401, "authentication_error", "a valid API key is required", headers={"WWW-Authenticate": "Bearer"}
        )
    request.state.tenant = found.tenant  # for the access log
    return found


def require_admin(who: Annotated[Caller, Depends(caller)]) -> Caller:
    """The admin role of the caller's tenant (403 for a user key)."""
    if who.role is not Role.ADMIN:
        raise ApiError(403, "permission_denied", "this route needs an admin key of the tenant")
    return who


StateDep = Annotated[AppState, Depends(app_state)]
CallerDep = Annotated[Caller, Depends(caller)]
