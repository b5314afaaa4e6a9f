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
from service.backends.base import Backend
from service.evidence import PolicyLibrary
from service.pipeline import Gatekeeper
from service.settings import Settings, load_settings
from service.telemetry import Metrics
from service.tiers import TierPool

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
        loading = asyncio.create_task(pool.load_all())
        try:
            yield
        finally:
            loading.cancel()
            await asyncio.gather(loading, return_exceptions=True)
            await asyncio.to_thread(pool.close)

    app = FastAPI(
        title="Gatekeeper",
        version=__version__,
        description="A local gatekeeper for AI agents: small local models judge each proposed "
        "action (allow, deny, revise, escalate), constrained to a per-request JSON grammar, "
        "grounded in cited evidence, and failing closed.",
        lifespan=lifespan,
    )
    install_error_handlers(app)
    app.add_middleware(BodySizeLimit, max_bytes=settings.max_body_bytes)
    app.include_router(router)
    return app
