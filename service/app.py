"""The FastAPI factory. Models load in the lifespan, in the background, so that /healthz
answers at once and /readyz says 503 until the tiers are loaded. Nothing heavy at import."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager

from fastapi import FastAPI

from service import __version__
from service.api.errors import install_error_handlers
from service.api.limits import BodySizeLimit
from service.api.routes import router
from service.api.serving import DecisionService
from service.backends.base import Backend
from service.decision.pipeline import Gatekeeper
from service.decision.tiers import TierPool
from service.evidence import PolicyLibrary
from service.ops.audit import DecisionLog
from service.ops.auth import Authenticator
from service.ops.drain import Drain
from service.ops.telemetry import Metrics
from service.settings import Settings, load_settings

logger = logging.getLogger(__name__)


def create_app(
    settings: Settings | None = None, backends: Mapping[str, Backend] | None = None
) -> FastAPI:
    """Build the app. `backends` serves tiers from ready-made backends (tests, embedding)."""
    settings = settings or load_settings()

    @asynccontextmanager
    async def lifespan(app: FastAPI) -> AsyncIterator[None]:
        metrics = Metrics()
        pool = TierPool(settings, metrics)
        for name, backend in (backends or {}).items():
            pool.attach(name, backend)
        app.state.metrics = metrics
        app.state.gatekeeper = Gatekeeper(
            settings, pool, PolicyLibrary(settings.policy_dirs), metrics
        )
        drain: Drain = app.state.drain
        drain.bind(asyncio.get_running_loop())
        log = DecisionLog(settings.audit.path) if settings.audit.enabled else None
        app.state.auth = Authenticator(settings.auth)
        app.state.decisions = DecisionService(
            app.state.gatekeeper, log, drain, redact=settings.audit.redact
        )
        loading = asyncio.create_task(pool.load_all())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await pool.aclose()
            await asyncio.to_thread(pool.close)
            if log is not None:
                await asyncio.to_thread(log.close)  # every append is in; fold the WAL

    app = FastAPI(
        title="Gatekeeper",
        version=__version__,
        description="A local gatekeeper for AI agents: small local models judge each proposed "
        "action (allow, deny, revise, escalate), constrained to a per-request JSON grammar, "
        "grounded in cited evidence, and failing closed.",
        lifespan=lifespan,
    )
    # made here, not in the lifespan, so that the server's SIGTERM handler can reach it
    app.state.drain = Drain(settings.shutdown_grace_s)
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(router)
    return app
