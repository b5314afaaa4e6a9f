"""The decision pipeline, framework-free: the HTTP API, the CLI and the benchmarks all call
`Gatekeeper`. A request is admitted once (client errors, its id, its `Budget`), then routed to
a tier, read there (service.decision.generation, service.decision.probe_path), perhaps escalated and revised, and
answered (service.decision.answers). Every fault on the decision path ends in a fail-closed answer."""

from __future__ import annotations

import logging
import uuid
from collections.abc import Callable

from service.decision import answers
from service.decision.budget import Admission, Budget
from service.decision.generation import FailClosed, Outcome
from service.decision.prompt import estimate_prompt_tokens
from service.decision.revision import RevisionAttempt, RevisionOutcome
from service.decision.routing import Route, RouteKind, TierView, choose_route
from service.decision.runner import RESPONSE_RESERVE_S, ReviseStep, TierRunner
from service.decision.tiers import Tier, TierPool
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.guards.injection import scan
from service.ops.telemetry import Metrics
from service.schemas import (
    Decision,
    DegradedReason,
    EvaluateRequest,
    EvaluateResponse,
    EvidenceItem,
    InjectionSignal,
    RouteInfo,
)
from service.settings import Settings

logger = logging.getLogger(__name__)


def _ms(seconds: float) -> float | None:
    return round(seconds * 1000, 1) if seconds < float("inf") else None


class Gatekeeper:
    def __init__(
        self, settings: Settings, pool: TierPool, policies: PolicyLibrary, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.policies = policies
        self.metrics = metrics
        self.runner = TierRunner(settings, pool, metrics)
        # sees every revision attempt, offered or not (the benchmark reads rejected ones)
        self.on_revision: Callable[[EvaluateRequest, RevisionAttempt], None] | None = None

    def admit(self, request: EvaluateRequest) -> Admission:
        """Client errors (4xx) are raised here, before any work is queued; then the request
        gets its id and its budget, whose clock starts now."""
        self.pool.get(request.tier or self.settings.default_tier)
        if request.policy is not None:
            self.policies.get(request.policy)
        if request.request_id is None:
            request = request.model_copy(update={"request_id": uuid.uuid4().hex})
        total_ms = request.latency_budget_ms or self.settings.default_latency_budget_ms
        return Admission(request, Budget.starting_now(total_ms))

    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        """Admit and decide: the whole of one request, for callers without an HTTP face."""
        return await self.decide(self.admit(request))

    async def decide(self, admission: Admission) -> EvaluateResponse:
        request, budget = admission.request, admission.budget
        try:
            signals = self._scan(request)
            evidence = self._evidence(request)
            route = self._route(request, evidence, budget)
        except Exception as exc:  # our own bug before any tier is chosen: fail closed too
            logger.exception(
                "unexpected error while routing", extra={"request_id": request.request_id}
            )
            detail = f"internal error: {type(exc).__name__}"
            return self.refuse(admission, DegradedReason.INTERNAL_ERROR, detail)
        tier = self.pool.get(route.tier or self.settings.default_tier)
        self.metrics.routes.labels(tier.name, route.kind.value).inc()
        info = RouteInfo(kind=route.kind.value, predicted_ms=_ms(route.predicted_s))
        revise = self.runner.revise_step(request, evidence, budget, signals)
        try:
            self._refuse_route(route, tier, budget)
            self.metrics.predicted_seconds.labels(tier.name).observe(route.predicted_s)
            inline = None if self._may_escalate(request) else revise
            outcome = await self.runner.run(
                tier, request, evidence, budget, route.max_prompt_tokens, inline
            )
            if request.tier is None:
                outcome = await self._escalate(outcome, request, evidence, budget, info, revise)
            attempt = (
                outcome.revision
                if outcome.revised
                else await self.runner.queued(revise, outcome, budget)
            )
        except FailClosed as fault:
            return self._fail_closed(admission, tier, fault, info, signals)
        except Exception as exc:  # our own bug: still an answer, and never "allow"
            logger.exception(
                "unexpected error on the decision path", extra={"request_id": request.request_id}
            )
            bug = FailClosed(DegradedReason.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            return self._fail_closed(admission, tier, bug, info, signals)
        if attempt is not None:
            self._book_revision(outcome.tier, request, attempt)
        return answers.answer(
            admission,
            outcome,
            info,
            signals,
            attempt,
            tier_threshold=self.settings.allow_threshold_of(outcome.tier.name),
            metrics=self.metrics,
        )

    def _refuse_route(self, route: Route, tier: Tier, budget: Budget) -> None:
        """Fail closed at once on a route that no tier can serve."""
        if route.kind == RouteKind.INFEASIBLE:
            raise FailClosed(
                DegradedReason.BUDGET_INFEASIBLE, f"no tier can answer within {budget.total_ms} ms"
            )
        if route.kind == RouteKind.OVERLOADED:
            raise FailClosed(DegradedReason.OVERLOADED, f"tier {tier.name} queue is full")
        if not tier.available:
            state = tier.state if tier.state != "loaded" else "without a live engine"
            raise FailClosed(
                DegradedReason.MODEL_UNAVAILABLE,
                f"tier {tier.name} is {state}" + (f": {tier.detail}" if tier.detail else ""),
            )

    def refuse(self, admission: Admission, reason: DegradedReason, detail: str) -> EvaluateResponse:
        """A fail-closed answer given without asking a model (e.g. at the end of a drain)."""
        request = admission.request
        tier = self.pool.get(request.tier or self.settings.default_tier)
        info = RouteInfo(kind="pinned" if request.tier else "fits")
        return self._fail_closed(admission, tier, FailClosed(reason, detail), info)

    def _fail_closed(
        self,
        admission: Admission,
        tier: Tier,
        fault: FailClosed,
        info: RouteInfo,
        signals: list[InjectionSignal] | None = None,
    ) -> EvaluateResponse:
        return answers.fail_closed(
            admission,
            tier.name,
            tier.model,
            fault,
            info,
            signals,
            decision=Decision(self.settings.fail_closed_decision),
            metrics=self.metrics,
        )

    def _scan(self, request: EvaluateRequest) -> list[InjectionSignal]:
        """The tripwire (service.guards.injection): what it finds caps the decision in the answer."""
        signals = scan(request) if self.settings.injection_tripwire else []
        for signal in signals:
            place = signal.place.split("[", 1)[0]
            self.metrics.injection_signals.labels(place, signal.kind).inc()
        if signals:
            logger.warning(
                "judge-directed text in the request",
                extra={
                    "request_id": request.request_id,
                    "signals": [f"{s.kind}@{s.place}" for s in signals],
                },
            )
        return signals

    def _evidence(self, request: EvaluateRequest) -> list[EvidenceItem]:
        """Supplied items first; then, when the request brings none or names a policy, the
        pack's rules: a small pack whole, in its own order, so that its tokens form a prefix
        that llama.cpp's KV cache shares across requests; a larger one through retrieval,
        the rules most relevant to this action and history first, up to the caps."""
        supplied = list(request.evidence or [])
        cap = self.settings.max_prompt_evidence
        if request.policy is None and request.evidence is not None:
            return supplied[:cap]
        pack = self.policies.get(request.policy or DEFAULT_PACK)
        taken = {item.id for item in supplied}
        room = max(0, min(self.settings.retrieval_top_k, cap - len(supplied)))
        rest = [item for item in pack.items if item.id not in taken]
        if len(rest) > room:
            rest = [i for i in pack.retrieve(request, len(pack.items)) if i.id not in taken]
        return (supplied + rest[:room])[:cap]

    def _prompt_tokens(
        self, request: EvaluateRequest, evidence: list[EvidenceItem]
    ) -> tuple[int, int]:
        return estimate_prompt_tokens(request, evidence, self.settings.max_turn_chars)

    def _route(
        self, request: EvaluateRequest, evidence: list[EvidenceItem], budget: Budget
    ) -> Route:
        prompt_tokens, min_tokens = self._prompt_tokens(request, evidence)
        remaining_s, q = budget.remaining(), self.settings.latency_quantile
        names = self.settings.ordered_tiers()
        names += [n for n in self.pool.tiers if n not in self.settings.tiers]
        views = [
            TierView(
                name=tier.name,
                available=tier.available,
                saturated=tier.saturated,
                predict_s=tier.predict(prompt_tokens, explain=request.explain, quantile=q),
                max_prompt_tokens=tier.prompt_tokens_within(
                    remaining_s - RESPONSE_RESERVE_S, explain=request.explain, quantile=q
                ),
            )
            for tier in (self.pool.tiers[n] for n in names if n in self.pool.tiers)
        ]
        if request.tier is None and not any(v.available for v in views):
            return Route(RouteKind.FITS, self.settings.default_tier, 0.0)
        return choose_route(
            views,
            remaining_s - RESPONSE_RESERVE_S,
            pinned=request.tier,
            min_prompt_tokens=min_tokens,
        )

    def _may_escalate(self, request: EvaluateRequest) -> bool:
        """Whether an unsure answer to this request may be re-asked of a stronger tier."""
        return request.tier is None and self.settings.escalate_below > 0

    def _stronger(
        self,
        outcome: Outcome,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        budget: Budget,
    ) -> Tier | None:
        """The first more capable tier that is open and predicted to answer in time, when the
        answer is unsure enough to re-ask (None otherwise)."""
        confidence = answers.confidence_of(outcome.answer.decision, outcome.generation.choice_probs)
        names = self.settings.ordered_tiers()
        if confidence >= self.settings.escalate_below or outcome.tier.name not in names:
            return None
        prompt_tokens, _ = self._prompt_tokens(request, evidence)
        for name in names[names.index(outcome.tier.name) + 1 :]:
            stronger = self.pool.tiers[name]
            if not stronger.available or stronger.saturated:
                continue
            predicted = stronger.predict(
                prompt_tokens, explain=request.explain, quantile=self.settings.latency_quantile
            )
            if budget.remaining() - predicted > RESPONSE_RESERVE_S:
                return stronger
        return None

    async def _escalate(
        self,
        outcome: Outcome,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        budget: Budget,
        info: RouteInfo,
        revise: ReviseStep,
    ) -> Outcome:
        """Re-ask a more capable tier when the answer is unsure and the budget allows."""
        stronger = self._stronger(outcome, request, evidence, budget)
        if stronger is None:
            return outcome
        self.metrics.escalations.labels(outcome.tier.name, stronger.name).inc()
        try:
            better = await self.runner.run(stronger, request, evidence, budget, None, revise)
        except FailClosed:
            return outcome  # the first answer stands; the stronger tier could not help
        better.loops = outcome.loops + better.loops
        info.escalated_from = outcome.tier.name
        return better

    def _book_revision(
        self, tier: Tier, request: EvaluateRequest, attempt: RevisionAttempt
    ) -> None:
        self.metrics.revisions.labels(tier.name, attempt.outcome.value).inc()
        self.runner.count_loops(attempt.loops)
        if attempt.outcome not in (RevisionOutcome.ALLOWED, RevisionOutcome.REJECTED):
            logger.info(
                "no revision on %s: %s %s", tier.name, attempt.outcome.value, attempt.detail
            )
        if self.on_revision is not None:
            self.on_revision(request, attempt)
