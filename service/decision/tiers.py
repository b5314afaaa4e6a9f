"""The loaded tiers: one backend per tier, one worker thread per backend.

A llama.cpp context is not thread-safe, so each local tier runs its generations on a
single-thread executor: generations are serialised by construction, even when the awaiting
request is cancelled (a client that hangs up cannot free the model for a second, concurrent
call). A remote tier whose engine batches (`ConcurrentBackend`, `max_concurrency` > 1) runs
its requests on the event loop instead, up to `max_concurrency` per live replica at once."""

from __future__ import annotations

import asyncio
import logging
import time
from collections import deque
from collections.abc import Awaitable, Callable
from concurrent.futures import ThreadPoolExecutor
from dataclasses import dataclass, field
from typing import Literal, TypeVar

from service.backends import create_backend
from service.backends.base import (
    Backend,
    ChatMessage,
    ConcurrentBackend,
    Generation,
    GenerationRequest,
    HiddenStateReader,
    Prompt,
)
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.probes import ProbeMismatchError, ProbeSet
from service.decision.prompt import SYSTEM_PROMPT, estimate_tokens
from service.decision.routing import LatencyModel
from service.errors import (
    ConfigurationError,
    EngineMissingError,
    GatekeeperError,
    ModelMissingError,
    UnknownTierError,
)
from service.ops.telemetry import Metrics
from service.ops.weights import ModelStore
from service.schemas import TierStatus
from service.settings import Settings, TierSettings

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
    pending: int = 0  # admitted requests waiting or running; counted by the pipeline
    probes: ProbeSet | None = None  # the tier decides through these when set
    latency: LatencyModel = field(default_factory=LatencyModel)
    # recent probe answers: True where the probe abstained and generation decided
    probe_abstained: deque[bool] = field(default_factory=lambda: deque(maxlen=64))
    executor: ThreadPoolExecutor = field(
        default_factory=lambda: ThreadPoolExecutor(max_workers=1, thread_name_prefix="tier")
    )

    @property
    def concurrent(self) -> bool:
        """Whether requests run on the event loop, many at once (a batching remote engine)."""
        backend = self.backend
        return isinstance(backend, ConcurrentBackend) and backend.max_concurrency > 1

    @property
    def available(self) -> bool:
        """Loaded, and its engine is there (a remote tier: some replica is live)."""
        return self.state == "loaded" and self.backend is not None and self.backend.health()

    @property
    def saturated(self) -> bool:
        backend = self.backend
        if isinstance(backend, ConcurrentBackend):
            if backend.busy:  # every replica answered 429/503 a moment ago
                return True
            if self.concurrent:
                capacity = backend.capacity
                return capacity > 0 and self.pending >= capacity
        return self.pending >= self.settings.max_queue

    def queue_s(self) -> float:
        """The wait before this tier starts a new request: none on a concurrent tier below
        its limit (the engine batches it with the others), a serial queue otherwise."""
        if self.concurrent:
            return 0.0
        return self.pending * self.latency.typical_service_s()

    def next_concurrency(self) -> int | None:
        """In flight on the engine with the next request (None: a serial tier)."""
        backend = self.backend
        if self.concurrent and isinstance(backend, ConcurrentBackend):
            return backend.next_concurrency()
        return None

    def observe(self, generation: Generation) -> None:
        self.latency.observe(
            prompt_tokens=generation.prompt_tokens,
            cached_tokens=generation.cached_tokens,
            prefill_s=generation.prefill_s,
            completion_tokens=generation.completion_tokens,
            decode_s=generation.decode_s,
            concurrency=generation.concurrency,
        )

    def note_probe(self, *, abstained: bool) -> None:
        self.probe_abstained.append(abstained)

    def probe_decides_alone(self, quantile: float) -> bool:
        """Whether the probe answered without generation in at least `quantile` of recent
        requests: only then is the latency at that quantile a prefill alone. Before any
        answer, or when it abstains often, routing must budget for the generation."""
        if self.probes is None or not self.probe_abstained:
            return False
        alone = 1.0 - sum(self.probe_abstained) / len(self.probe_abstained)
        return alone >= quantile

    def output_tokens(self, *, explain: bool, quantile: float, rationale_only: bool = False) -> int:
        """The most tokens an answer on this tier can take, from the bounds its grammar puts
        on it: decision, ids and rationale; the rationale alone (`rationale_only`: after a
        probe decided, with the decision fixed). A probe that decides alone often enough (see
        `probe_decides_alone`) answers after the prefill: routing counts no output for it,
        its rationale being generated only if time is left."""
        limits = self.settings
        rationale = estimate_tokens(limits.rationale_chars)
        if rationale_only:
            tokens = rationale + 16
        elif self.probe_decides_alone(quantile):
            tokens = 0
        else:
            tokens = rationale + 48 if explain else 8
        return min(limits.max_tokens, tokens)

    def predict(
        self,
        prompt_tokens: int,
        *,
        explain: bool,
        quantile: float,
        rationale_only: bool = False,
        queued: bool = True,
    ) -> float:
        """Seconds to answer a request of `prompt_tokens` here, at the quantile of slowness:
        the queue wait before it (`queued`: it has not reached the worker yet), then the
        prefill and the output. Routing, escalation and the probe's "does a rationale fit"
        all ask this one question."""
        return self.latency.predict(
            prompt_tokens,
            self.output_tokens(explain=explain, quantile=quantile, rationale_only=rationale_only),
            self.queue_s() if queued else 0.0,
            quantile=quantile,
            concurrency=self.next_concurrency(),
        )

    def prompt_tokens_within(self, seconds: float, *, explain: bool, quantile: float) -> int:
        """The largest prompt that this tier would answer within `seconds`, queue included."""
        return self.latency.prompt_tokens_within(
            seconds - self.queue_s(),
            self.output_tokens(explain=explain, quantile=quantile),
            quantile=quantile,
            concurrency=self.next_concurrency(),
        )

    async def run(self, fn: Callable[[float], T], deadline: float) -> T:
        """Run `fn(queue_wait_s)` on the tier's worker; give up waiting at `deadline`."""
        submitted = time.monotonic()

        def job() -> T:
            started = time.monotonic()
            if started >= deadline:
                raise QueueWaitExceededError()
            return fn(started - submitted)

        future = asyncio.get_running_loop().run_in_executor(self.executor, job)
        # shield: a cancelled caller must not orphan the running job's result silently
        return await asyncio.shield(future)

    async def run_concurrent(self, fn: Callable[[float], Awaitable[T]], deadline: float) -> T:
        """Run `fn(queue_wait_s)` on the event loop, beside the tier's other requests (no
        queue here: admission stops at the tier's capacity). Cancelling it closes the stream,
        which stops the engine's work on it."""
        if time.monotonic() >= deadline:
            raise QueueWaitExceededError()
        return await fn(0.0)


class TierPool:
    def __init__(self, settings: Settings, metrics: Metrics) -> None:
        self._settings = settings
        self._metrics = metrics
        self.tiers: dict[str, Tier] = {
            name: Tier(name, settings.tiers[name], latency=self._latency_model())
            for name in settings.ordered_tiers()
        }
        wanted = settings.load_tiers
        for name, tier in self.tiers.items():
            if wanted is not None and name not in wanted:
                tier.state, tier.detail = "unavailable", "not in load_tiers"

    def _latency_model(self) -> LatencyModel:
        return LatencyModel(self._settings.latency_window, self._settings.latency_max_age_s)

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
        tier = self.tiers.get(name) or Tier(
            name, TierSettings(backend="fake"), latency=self._latency_model()
        )
        self.tiers[name] = tier
        tier.backend, tier.model, tier.state = backend, backend.model, "loading"

    def _load_one(self, tier: Tier) -> None:
        try:
            if tier.backend is None:
                tier.backend = create_backend(tier.settings, ModelStore(self._settings))
                tier.model = tier.backend.model
            tier.backend.load()
            if self._settings.warmup:
                self._warm_up(tier, tier.backend)
            tier.detail = None  # a refused probe says so here
            self._attach_probes(tier, tier.backend)
        except GatekeeperError as exc:
            missing = isinstance(exc, (ModelMissingError, EngineMissingError))
            tier.state = "unavailable" if missing else "failed"
            tier.detail = exc.message
            logger.warning("tier %s %s: %s", tier.name, tier.state, exc.message)
            return
        tier.state = "loaded"
        self._metrics.model_loaded.labels(tier.name, tier.model or "").set(1)
        logger.info("tier %s loaded %s", tier.name, tier.model)

    def _attach_probes(self, tier: Tier, backend: Backend) -> None:
        """Load the tier's probe and check that it was trained for this very model and prompt;
        refuse it otherwise (the tier then decides by generation, and says why)."""
        path = tier.settings.probe_path
        tier.probes = None
        if path is None:
            return
        try:
            if not isinstance(backend, HiddenStateReader):
                raise ConfigurationError(f"backend {backend.engine} cannot read hidden states")
            probes = ProbeSet.load(path)
            probes.check(backend.model_sha256)
            if max(probes.layers) >= backend.n_layers - 1:
                raise ProbeMismatchError(f"probe layers {probes.layers} exceed the model's")
        except GatekeeperError as exc:
            tier.detail = f"probe refused: {exc.message}"
            logger.error("tier %s: %s", tier.name, tier.detail)
            return
        tier.probes = probes
        logger.info("tier %s decides through probe %s", tier.name, path.name)

    def _warm_up(self, tier: Tier, backend: Backend) -> None:
        """One short generation, to seed the tier's latency model before the first request."""
        prompt = Prompt(
            (
                ChatMessage("system", SYSTEM_PROMPT),
                ChatMessage("user", "## Proposed action\nls -la"),
            ),
            RESPONSE_PREFIX,
        )
        constraint = build_constraint(AnswerShape((), (), 0, rationale_chars=80, revision_chars=40))
        request = GenerationRequest(
            prompt, constraint, max_tokens=24, deadline=time.monotonic() + 120
        )
        tier.observe(backend.generate(request))

    async def load_all(self) -> None:
        for tier in self.tiers.values():
            if tier.state == "loading":
                await asyncio.get_running_loop().run_in_executor(
                    tier.executor, self._load_one, tier
                )
                if tier.available and isinstance(tier.backend, ConcurrentBackend):
                    await tier.backend.start(self._replica_listener(tier.name))

    def _replica_listener(self, tier: str) -> Callable[[str, str], None]:
        metrics = self._metrics

        def on_event(replica: str, event: str) -> None:
            kind, _, reason = event.partition(":")
            if kind == "state":  # where each replica stands at start
                metrics.replica_up.labels(tier, replica).set(1 if reason == "up" else 0)
                return
            metrics.replica_events.labels(tier, replica, kind).inc()
            if kind in ("ejected", "readmitted"):
                metrics.replica_up.labels(tier, replica).set(1 if kind == "readmitted" else 0)
            log = logger.warning if kind == "ejected" else logger.info
            log("tier %s replica %s %s", tier, replica, event, extra={"reason": reason or None})

        return on_event

    def statuses(self) -> list[TierStatus]:
        return [
            TierStatus(name=t.name, state=t.state, model=t.model, detail=t.detail)
            for t in self.tiers.values()
        ]

    @property
    def ready(self) -> bool:
        states = [t.state for t in self.tiers.values()]
        return "loaded" in states and "loading" not in states

    async def aclose(self) -> None:
        """The event-loop side of the remote tiers (async clients, health checks); `close`
        does the rest."""
        for tier in self.tiers.values():
            if isinstance(tier.backend, ConcurrentBackend):
                await tier.backend.aclose()

    def close(self) -> None:
        for tier in self.tiers.values():
            if tier.backend is not None:
                tier.executor.submit(tier.backend.close)
            tier.executor.shutdown(wait=True, cancel_futures=True)
            self._metrics.model_loaded.labels(tier.name, tier.model or "").set(0)
