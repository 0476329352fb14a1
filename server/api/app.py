"""The FastAPI application. Heavy objects (model, store, engine) are built in the lifespan, not at import."""

from __future__ import annotations

import asyncio
import gc
import logging
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager

from fastapi import FastAPI
from fastapi_offline import FastAPIOffline
from starlette.types import Scope

from prefix_store.errors import PrefixStoreError
from prefix_store.storage.store import open_store
from server.api.auth import load_auth_config
from server.api.errors import install_error_handlers
from server.api.metrics import install_metrics
from server.api.middleware import AccessLogMiddleware, BodyLimitMiddleware, PathCheckMiddleware
from server.api.openai.router import router as openai_router
from server.api.openapi import install_openapi
from server.api.routes import admin, cache, generate, health, tokenizer
from server.api.state import AppState
from server.api.tenancy import TenantGate
from server.config import ServeSettings, StartupError
from server.engine.base_model import load_base_model
from server.engine.grammar import GrammarCompiler
from server.engine.model_support import UnsupportedModel
from server.engine.startup import start_engine
from server.model_source import ModelSourceError, resolve_model
from server.version import package_version

log = logging.getLogger(__name__)

_UPLOAD_OVERHEAD_BYTES = 256 * 1024  # multipart framing and the PEFT config beside the tensors


def build_state(settings: ServeSettings) -> AppState:
    """Read the keys, load the model, open the store and start the engine."""
    auth = load_auth_config(
        settings.api_keys,
        requests_per_minute=settings.tenant_requests_per_minute,
        max_concurrent=settings.tenant_max_concurrent,
        max_prefixes=settings.tenant_max_prefixes,
        max_prefix_bytes=settings.tenant_max_prefix_bytes,
    )
    try:
        source = resolve_model(settings.model)
        log.info("base model %s: %s", source.model_id, source.description)
        base = load_base_model(
            source.path, device=settings.device, dtype=settings.dtype, model_id=source.model_id
        )
    except ModelSourceError as exc:
        raise StartupError(f"--model {settings.model}: {exc}") from exc
    except UnsupportedModel as exc:
        raise StartupError(f"--model {settings.model}: cannot serve it: {exc}") from None
    except (OSError, ValueError) as exc:  # no such model, not one transformers can load
        raise StartupError(f"--model {settings.model}: cannot load it: {exc}") from exc
    try:
        store = open_store(settings.store)
    except (OSError, ValueError, PrefixStoreError) as exc:
        raise StartupError(f"--store {settings.store}: {exc}") from exc
    try:
        running = start_engine(base, store, settings.engine_config())
    except ValueError as exc:  # a KV pool too small for the batch
        raise StartupError(f"PREFIX_SERVE_KV_CACHE_BYTES={settings.kv_cache_bytes}: {exc}") from None
    grammars = GrammarCompiler(base.tokenizer, base.eos_token_ids)
    return AppState(settings, base, store, running, auth, TenantGate(auth), grammars=grammars)


def freeze_startup_objects() -> None:
    """Move every object alive after start-up (the libraries', the model's, the tokenizer's: ~400k on
    the demo model) out of the garbage collector's reach. They live as long as the process; left in,
    each full collection scans them all, ~200 ms on a CPU during which every request stalls."""
    gc.collect()
    gc.freeze()


def begin_stopping(app: FastAPI) -> None:
    """A stop signal came (called from the signal handler, on the event loop's thread): the engine stops
    admitting at once and gives running requests the grace period, then aborts the rest, each of which
    answers 503 — all before the HTTP server's own, slightly longer, timeout would cancel them into a
    bare 500. The lifespan's shutdown then finds the engine drained."""
    state: AppState | None = getattr(app.state, "prefix_serve", None)
    if state is None or getattr(app.state, "draining", None) is not None:
        return
    loop = asyncio.get_running_loop()

    def start() -> None:
        app.state.draining = loop.create_task(state.engine.drain(state.settings.shutdown_grace_s))

    loop.call_soon_threadsafe(start)


def create_app(settings: ServeSettings) -> FastAPI:
    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        log.info("effective configuration: %s", settings.model_dump(mode="json"))
        state = build_state(settings)
        state.metrics = app.state.metrics
        state.metrics.attach(state.engine, state.registry)
        if not state.auth.enabled:
            log.warning(
                "AUTH IS OFF: no --api-keys given; every caller is tenant 'default' with the admin role"
            )
        log.info(
            "per-tenant limits (%s): %s; server-wide: %d waiting requests",
            "tenants without their own in the keys file" if state.auth.enabled else "auth off",
            state.auth.default_limits.describe(),
            settings.max_queue,
        )
        if state.auth.tenant_limits:
            log.info("%d tenants have limits of their own in the keys file", len(state.auth.tenant_limits))
        app.state.prefix_serve = state
        freeze_startup_objects()
        try:
            yield
        finally:
            await state.running.stop(settings.shutdown_grace_s)
            state.store.close()

    def body_limit(scope: Scope) -> int:
        if scope.get("method") == "PUT" and scope.get("path", "").startswith("/v1/admin/prefixes/"):
            return settings.max_upload_bytes + _UPLOAD_OVERHEAD_BYTES
        return settings.max_request_bytes

    app = FastAPIOffline(  # /docs and /redoc from the installed package's files, never a CDN
        title="PrefixServe",
        version=package_version(),
        lifespan=lifespan,
        static_url="/docs/assets",
        swagger_ui_parameters={"validatorUrl": None},  # no badge fetched from the online validator
    )
    install_error_handlers(app)
    install_openapi(app, settings)
    for router in (
        health.router,
        generate.router,
        admin.router,
        cache.router,
        openai_router,
        tokenizer.router,
    ):
        app.include_router(router)
    app.add_middleware(BodyLimitMiddleware, limit_for=body_limit)
    app.add_middleware(PathCheckMiddleware)
    install_metrics(app)  # inside the access log (outermost), outside the body limit: sees its 413s
    app.add_middleware(
        AccessLogMiddleware, replica_name=settings.replica_name
    )  # outermost: sees every response
    return app
