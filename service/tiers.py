"""The loaded tiers: one backend per tier, one worker thread per backend.

A llama.cpp context is not thread-safe, so each tier runs its generations on a single-thread
executor: generations are serialised by construction, even when the awaiting request is
cancelled (a client that hangs up cannot free the model for a second, concurrent call)."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from service.backends import create_backend
from service.backends.base import Backend
from service.errors import GatekeeperError, UnknownTierError
from service.schemas import TierStatus
from service.settings import Settings, TierSettings
from service.telemetry import Metrics
from service.weights import ModelStore

logger = logging.getLogger(__name__)

T = TypeVar("T")
TierState = Literal["loaded", "loading", "unavailable", "failed"]


class QueueWaitExceededError(Exception):
    """The deadline passed while the request waited for the tier's worker."""


@dataclass
class Tier:
    name: str
    settings: TierSettings
    backend: Backend | None = None
    model: str | None = None
    state: TierState = "loading"
    detail: str | None = None
    pending: int = 0
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier")
    )

    async def run(self, fn: Callable[[float], T], deadline: float) -> T:
        """Run `fn(queue_wait_s)` on the tier's worker; give up waiting at `deadline`."""
        submitted = time.monotonic()

        def job() -> T:
            started = time.monotonic()
            if started >= deadline:
                raise QueueWaitExceededError()
            return fn(started - submitted)

        self.pending += 1
        try:
            future = asyncio.get_running_loop().run_in_executor(self.executor, job)
            # shield: a cancelled caller must not orphan the running job's result silently
            return await asyncio.shield(future)
        finally:
            self.pending -= 1


class TierPool:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.tiers: dict[str, Tier] = {
            name: Tier(name, settings.tiers[name]) for name in settings.ordered_tiers()
        }
        wanted = settings.load_tiers
        for name, tier in self.tiers.items():
            if wanted is not None and name not in wanted:
                tier.state, tier.detail = "unavailable", "not in load_tiers"

    def get(self, name: str) -> Tier:
        tier = self.tiers.get(name)
        if tier is None:
            raise UnknownTierError(
                f"unknown tier {name!r}; configured: {', '.join(self.tiers) or 'none'}",
                param="tier",
            )
        return tier

    def attach(self, name: str, backend: Backend) -> None:
        """Serve a tier from an already constructed backend (tests, embedding)."""
        tier = self.tiers.get(name) or Tier(name, TierSettings(backend="fake"))
        self.tiers[name] = tier
        tier.backend, tier.model, tier.state = backend, backend.model, "loading"

    def _load_one(self, tier: Tier) -> None:
        try:
            if tier.backend is None:
                model, path = ModelStore(self._settings).resolve_tier(tier.settings)
                tier.model = model
                tier.backend = create_backend(model, path, tier.settings)
            tier.backend.load()
        except GatekeeperError as exc:
            missing = "not installed" in exc.message or "not found" in exc.message
            tier.state = "unavailable" if missing else "failed"
            tier.detail = exc.message
            logger.warning("tier %s %s: %s", tier.name, tier.state, exc.message)
            return
        tier.state, tier.detail = "loaded", None
        self._metrics.model_loaded.labels(tier.name, tier.model or "").set(1)
        logger.info("tier %s loaded %s", tier.name, tier.model)

    async def load_all(self) -> None:
        for tier in self.tiers.values():
            if tier.state == "loading":
                await asyncio.get_running_loop().run_in_executor(
                    tier.executor, self._load_one, tier
                )

    def statuses(self) -> list[TierStatus]:
        return [
            TierStatus(name=t.name, state=t.state, model=t.model, detail=t.detail)
            for t in self.tiers.values()
        ]

    @property
    def ready(self) -> bool:
        states = [t.state for t in self.tiers.values()]
        return "loaded" in states and "loading" not in states

    def close(self) -> None:
        for tier in self.tiers.values():
            if tier.backend is not None:
                tier.executor.submit(tier.backend.close)
            tier.executor.shutdown(wait=True, cancel_futures=True)
            self._metrics.model_loaded.labels(tier.name, tier.model or "").set(0)
