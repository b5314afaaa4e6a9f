"""The decision pipeline, framework-free: the HTTP API, the CLI and the benchmarks all call
`Gatekeeper.evaluate`. Every fault on the decision path ends in a fail-closed answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from collections.abc import Callable

from service.attempts import (
    FailClosed,
    LoopFailure,
    Outcome,
    arun_on_tier,
    run_on_tier,
    run_probe_on_tier,
)
from service.backends.base import ChoicePolicy
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.injection import scan
from service.prompt import PREAMBLE_CHARS, render_action
from service.reviser import RevisionAttempt, RevisionOutcome, revise_on_tier, unsafe_verdict
from service.routing import Route, RouteKind, TierView, choose_route
from service.schemas import (
    Decision,
    DegradedReason,
    EvaluateRequest,
    EvaluateResponse,
    EvidenceItem,
    InjectionSignal,
    LoopReport,
    ProposedAction,
    RouteInfo,
    Timing,
    Usage,
)
from service.settings import Settings
from service.telemetry import Metrics
from service.tiers import QueueWaitExceededError, Tier, TierPool

logger = logging.getLogger(__name__)

# Time kept back from the budget for verification and the response itself.
_RESPONSE_RESERVE_S = 0.02
# Conservative: English text runs ~4 characters per token in these tokenizers.
_CHARS_PER_TOKEN = 3.2


def _ms(seconds: float) -> float | None:
    return round(seconds * 1000, 1) if seconds < float("inf") else None


def _output_tokens(rationale_chars: int, explain: bool, probe: bool = False) -> int:
    """Upper bound the grammar puts on the answer, in tokens (decision, ids, rationale). A
    probe answers after the prefill: its rationale is generated only if time is left, so
    routing counts none (`probe`: the tier's probe decides alone often enough, see
    Tier.probe_decides_alone)."""
    if probe:
        return 0
    return int(rationale_chars / _CHARS_PER_TOKEN) + 48 if explain else 8


def normalised(probs: dict[str, float]) -> dict[str, float]:
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()} if total > 0 else {}


def decision_policy(allow_threshold: float) -> ChoicePolicy:
    """A threshold on P(allow), as Llama Guard thresholds P(unsafe): 'allow' exactly when
    P(allow) >= allow_threshold; otherwise the likeliest other decision, except that an
    'allow' that was likeliest but not likely enough goes to a human."""

    def choose(probs: dict[str, float]) -> str:
        p = normalised(probs)
        allow = Decision.ALLOW.value
        if p.get(allow, 0.0) >= allow_threshold and allow in p:
            return allow
        best = max(p, key=p.__getitem__)
        if best == allow:
            return Decision.ESCALATE.value
        return best

    return choose


def confidence_of(decision: Decision, probs: dict[str, float]) -> float:
    """P(allow) for an allow, else P(not allow): the gate's own question, safe or not."""
    p_allow = normalised(probs).get(Decision.ALLOW.value)
    if p_allow is None:
        return 0.5  # the engine exposed no probabilities
    return p_allow if decision == Decision.ALLOW else 1.0 - p_allow


class Gatekeeper:
    def __init__(
        self, settings: Settings, pool: TierPool, policies: PolicyLibrary, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.policies = policies
        self.metrics = metrics
        # sees every revision attempt, offered or not (the benchmark reads rejected ones)
        self.on_revision: Callable[[EvaluateRequest, RevisionAttempt], None] | None = None

    def _threshold(self, tier: str) -> float:
        """The tier's own allow threshold, else the global one (attached tiers have none)."""
        own = self.settings.tiers.get(tier)
        if own is not None and own.allow_threshold is not None:
            return own.allow_threshold
        return self.settings.allow_threshold

    def validate(self, request: EvaluateRequest) -> None:
        """Client errors (4xx) are raised here, before any work is queued."""
        self.pool.get(request.tier or self.settings.default_tier)
        if request.policy is not None:
            self.policies.get(request.policy)

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

    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        start = time.monotonic()
        self.validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        budget_ms = request.latency_budget_ms or self.settings.default_latency_budget_ms
        deadline = start + budget_ms / 1000.0
        try:
            signals = self._scan(request, request_id)
            evidence = self._evidence(request)
            route = self._route(request, evidence, deadline - start)
        except Exception as exc:  # our own bug before any tier is chosen: fail closed too
            logger.exception("unexpected error while routing", extra={"request_id": request_id})
            detail = f"internal error: {type(exc).__name__}"
            request = request.model_copy(update={"request_id": request_id})
            return self.refuse(request, DegradedReason.INTERNAL_ERROR, detail, start=start)
        tier = self.pool.get(route.tier or self.settings.default_tier)
        self.metrics.routes.labels(tier.name, route.kind.value).inc()
        info = RouteInfo(kind=route.kind.value, predicted_ms=_ms(route.predicted_s))
        try:
            if route.kind == RouteKind.INFEASIBLE:
                raise FailClosed(
                    DegradedReason.BUDGET_INFEASIBLE,
                    f"no tier can answer within {budget_ms} ms",
                )
            if route.kind == RouteKind.OVERLOADED:
                raise FailClosed(DegradedReason.OVERLOADED, f"tier {tier.name} queue is full")
            if not tier.available:
                state = tier.state if tier.state != "loaded" else "without a live engine"
                raise FailClosed(
                    DegradedReason.MODEL_UNAVAILABLE,
                    f"tier {tier.name} is {state}" + (f": {tier.detail}" if tier.detail else ""),
                )
            self.metrics.predicted_seconds.labels(tier.name).observe(route.predicted_s)
            outcome = await self._run(tier, request, evidence, deadline, route.max_prompt_tokens)
            if request.tier is None:
                outcome = await self._escalate(outcome, request, evidence, deadline, info)
            attempt = await self._revise(outcome, request, evidence, deadline, signals)
        except FailClosed as fault:
            return self._fail_closed(request_id, tier, fault, start, budget_ms, info, signals)
        except Exception as exc:  # our own bug: still an answer, and never "allow"
            logger.exception(
                "unexpected error on the decision path", extra={"request_id": request_id}
            )
            bug = FailClosed(DegradedReason.INTERNAL_ERROR, f"internal error: {type(exc).__name__}")
            return self._fail_closed(request_id, tier, bug, start, budget_ms, info, signals)
        return self._answer(request_id, outcome, start, budget_ms, info, signals, attempt)

    def _scan(self, request: EvaluateRequest, request_id: str) -> list[InjectionSignal]:
        """The tripwire (service.injection): what it finds caps the decision in `_answer`."""
        signals = scan(request) if self.settings.injection_tripwire else []
        for signal in signals:
            place = signal.place.split("[", 1)[0]
            self.metrics.injection_signals.labels(place, signal.kind).inc()
        if signals:
            logger.warning(
                "judge-directed text in the request",
                extra={
                    "request_id": request_id,
                    "signals": [f"{s.kind}@{s.place}" for s in signals],
                },
            )
        return signals

    def refuse(
        self,
        request: EvaluateRequest,
        reason: DegradedReason,
        detail: str,
        *,
        start: float | None = None,
    ) -> EvaluateResponse:
        """A fail-closed answer given without asking a model (e.g. at the end of a drain)."""
        tier = self.pool.get(request.tier or self.settings.default_tier)
        budget_ms = request.latency_budget_ms or self.settings.default_latency_budget_ms
        return self._fail_closed(
            request.request_id or uuid.uuid4().hex,
            tier,
            FailClosed(reason, detail),
            time.monotonic() if start is None else start,
            budget_ms,
            RouteInfo(kind="pinned" if request.tier else "fits"),
        )

    def _estimate_tokens(
        self, request: EvaluateRequest, evidence: list[EvidenceItem]
    ) -> tuple[int, int]:
        """(whole prompt, smallest prompt) in tokens, estimated from characters: routing must
        not tokenise on the event loop."""
        fixed = PREAMBLE_CHARS + len(request.goal) + len(render_action(request)) + 200
        turns = sum(
            min(
                self.settings.max_turn_chars,
                len(t.content) + len(t.thought or "") + len(t.action or ""),
            )
            for t in request.history
        )
        ev = sum(len(e.model_dump_json()) for e in evidence)
        whole = fixed + min(len(request.agent.profile), self.settings.max_turn_chars) + turns + ev
        return int(whole / _CHARS_PER_TOKEN), int(fixed / _CHARS_PER_TOKEN)

    def _route(
        self, request: EvaluateRequest, evidence: list[EvidenceItem], remaining_s: float
    ) -> Route:
        prompt_tokens, min_tokens = self._estimate_tokens(request, evidence)
        views = []
        for name in self.settings.ordered_tiers() + [
            n for n in self.pool.tiers if n not in self.settings.tiers
        ]:
            tier = self.pool.tiers.get(name)
            if tier is None:
                continue
            limits = tier.settings
            probe = tier.probe_decides_alone(self.settings.latency_quantile)
            out = min(
                limits.max_tokens,
                _output_tokens(limits.rationale_chars, request.explain, probe),
            )
            # a serial tier queues; a concurrent one is predicted at the load it has now
            queue_s, concurrency = tier.queue_s(), tier.next_concurrency()
            q = self.settings.latency_quantile
            views.append(
                TierView(
                    name=name,
                    available=tier.available,
                    saturated=tier.saturated,
                    predict_s=tier.latency.predict(
                        prompt_tokens, out, queue_s, quantile=q, concurrency=concurrency
                    ),
                    max_prompt_tokens=tier.latency.prompt_tokens_within(
                        remaining_s - queue_s - _RESPONSE_RESERVE_S,
                        out,
                        quantile=q,
                        concurrency=concurrency,
                    ),
                )
            )
        if request.tier is None and not any(v.available for v in views):
            return Route(RouteKind.FITS, self.settings.default_tier, 0.0)
        return choose_route(
            views,
            remaining_s - _RESPONSE_RESERVE_S,
            pinned=request.tier,
            min_prompt_tokens=min_tokens,
        )

    async def _escalate(
        self,
        outcome: Outcome,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        deadline: float,
        info: RouteInfo,
    ) -> Outcome:
        """Re-ask a more capable tier when the answer is unsure and the budget allows."""
        confidence = confidence_of(outcome.answer.decision, outcome.generation.choice_probs)
        if confidence >= self.settings.escalate_below:
            return outcome
        names = self.settings.ordered_tiers()
        if outcome.tier.name not in names:
            return outcome
        prompt_tokens, _ = self._estimate_tokens(request, evidence)
        for name in names[names.index(outcome.tier.name) + 1 :]:
            stronger = self.pool.tiers[name]
            if not stronger.available or stronger.saturated:
                continue
            out = min(
                stronger.settings.max_tokens,
                _output_tokens(
                    stronger.settings.rationale_chars,
                    request.explain,
                    stronger.probe_decides_alone(self.settings.latency_quantile),
                ),
            )
            predicted = stronger.latency.predict(
                prompt_tokens,
                out,
                stronger.queue_s(),
                quantile=self.settings.latency_quantile,
                concurrency=stronger.next_concurrency(),
            )
            if time.monotonic() + predicted > deadline - _RESPONSE_RESERVE_S:
                continue
            self.metrics.escalations.labels(outcome.tier.name, name).inc()
            try:
                better = await self._run(stronger, request, evidence, deadline, None)
            except FailClosed:
                return outcome  # the first answer stands; the stronger tier could not help
            better.loops = outcome.loops + better.loops
            info.escalated_from = outcome.tier.name
            return better
        return outcome

    def _fallback(self, tried: list[str]) -> Tier | None:
        """Another loaded tier after a loop: the next more capable one, else a weaker one."""
        names = self.settings.ordered_tiers()
        last = names.index(tried[-1]) if tried[-1] in names else len(names)
        order = names[last + 1 :] + names[:last][::-1]
        for name in order:
            tier = self.pool.tiers.get(name)
            if name not in tried and tier is not None and tier.available:
                return tier
        return None

    async def _run(
        self,
        tier: Tier,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        deadline: float,
        max_prompt_tokens: int | None,
    ) -> Outcome:
        loops: list[LoopReport] = []
        tried = [tier.name]
        while True:
            try:
                outcome = await self._run_on(tier, request, evidence, deadline, max_prompt_tokens)
            except LoopFailure as failure:
                loops += failure.loops
                other = self._fallback(tried)
                if other is None or time.monotonic() >= deadline:
                    self._count_loops(loops)
                    raise FailClosed(
                        DegradedReason.DOOM_LOOP, "the model looped and could not recover", loops
                    ) from failure
                loops[-1].action = "other_tier"
                tier = other
                tried.append(tier.name)
                continue
            except FailClosed as fault:
                fault.loops = loops + fault.loops
                self._count_loops(fault.loops)
                raise
            outcome.loops = loops + outcome.loops
            self._count_loops(outcome.loops)
            return outcome

    async def _run_on(
        self,
        tier: Tier,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        deadline: float,
        max_prompt_tokens: int | None,
    ) -> Outcome:
        judge = self._judge(tier, evidence, deadline, max_prompt_tokens)
        choose = decision_policy(self._threshold(tier.name))

        def job(queue_s: float) -> Outcome:
            return judge(request, queue_s)

        async def concurrent_job(queue_s: float) -> Outcome:
            return await arun_on_tier(
                tier,
                request,
                evidence,
                deadline,
                queue_s,
                settings=self.settings,
                choose=choose,
                metrics=self.metrics,
                max_prompt_tokens=max_prompt_tokens,
            )

        # admission is counted before the first await, so that concurrent requests routed in
        # the same loop iteration see each other
        tier.pending += 1
        self.metrics.queue_depth.labels(tier.name).set(tier.pending)
        running = (
            tier.run_concurrent(concurrent_job, deadline)
            if tier.concurrent and tier.probes is None
            else tier.run(job, deadline)
        )
        try:
            return await asyncio.wait_for(
                running, timeout=max(0.0, deadline - time.monotonic()) + _RESPONSE_RESERVE_S
            )
        except (TimeoutError, QueueWaitExceededError) as exc:
            raise FailClosed(DegradedReason.DEADLINE, "the latency budget ran out") from exc
        finally:
            tier.pending -= 1
            self.metrics.queue_depth.labels(tier.name).set(tier.pending)

    def _judge(
        self,
        tier: Tier,
        evidence: list[EvidenceItem],
        deadline: float,
        max_prompt_tokens: int | None,
    ) -> Callable[[EvaluateRequest, float], Outcome]:
        """How the tier reads a request: its probe, else generation (on its worker)."""
        run = run_probe_on_tier if tier.probes is not None else run_on_tier
        choose = decision_policy(self._threshold(tier.name))

        def judge(request: EvaluateRequest, queue_s: float) -> Outcome:
            return run(
                tier,
                request,
                evidence,
                deadline,
                queue_s,
                settings=self.settings,
                choose=choose,
                metrics=self.metrics,
                max_prompt_tokens=max_prompt_tokens,
            )

        return judge

    def _settle(self, outcome: Outcome) -> tuple[Decision, float]:
        """The decision and its confidence, an allow held to the tier's threshold: an engine
        that picks the decision itself (a remote one) meets the same bar as one whose
        decision we force from the logits."""
        decision = outcome.answer.decision
        confidence = confidence_of(decision, outcome.generation.choice_probs)
        allow_at = outcome.allow_at
        threshold = allow_at if allow_at is not None else self._threshold(outcome.tier.name)
        if decision == Decision.ALLOW and confidence < threshold:
            decision, confidence = Decision.ESCALATE, 1.0 - confidence
        return decision, confidence

    async def _revise(
        self,
        outcome: Outcome,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        deadline: float,
        signals: list[InjectionSignal],
    ) -> RevisionAttempt | None:
        """After an unsafe verdict, when the request (or its tier) asks: a safer action of the
        same shape, read by the same judge in the same context (service.reviser)."""
        tier = outcome.tier
        wanted = request.revise if request.revise is not None else tier.settings.revise
        decision, _ = self._settle(outcome)
        p_allow = normalised(outcome.generation.choice_probs).get(Decision.ALLOW.value)
        backend = tier.backend
        if not wanted or not unsafe_verdict(decision, p_allow) or backend is None:
            return None
        if backend.engine == "openai":
            return None  # a remote engine writes the answer's opening itself, not the revision's
        if signals:  # the request argued with the judge: no action of the model's is offered
            attempt = RevisionAttempt(RevisionOutcome.TRIPWIRE)
        else:
            read = self._judge(tier, evidence, deadline, None)

            def judge(candidate: EvaluateRequest) -> tuple[Decision, float]:
                return self._settle(read(candidate, 0.0))

            def job(_queue_s: float) -> RevisionAttempt:
                return revise_on_tier(
                    tier,
                    request,
                    outcome,
                    decision,
                    deadline,
                    judge=judge,
                    settings=self.settings,
                    metrics=self.metrics,
                )

            tier.pending += 1
            self.metrics.queue_depth.labels(tier.name).set(tier.pending)
            try:
                attempt = await asyncio.wait_for(
                    tier.run(job, deadline),
                    timeout=max(0.0, deadline - time.monotonic()) + _RESPONSE_RESERVE_S,
                )
            except (TimeoutError, QueueWaitExceededError):
                attempt = RevisionAttempt(RevisionOutcome.NO_BUDGET, detail="the budget ran out")
            except Exception as exc:  # our own bug: the original decision stands
                logger.exception("revision step failed", extra={"request_id": request.request_id})
                attempt = RevisionAttempt(RevisionOutcome.FAULT, detail=type(exc).__name__)
            finally:
                tier.pending -= 1
                self.metrics.queue_depth.labels(tier.name).set(tier.pending)
        self.metrics.revisions.labels(tier.name, attempt.outcome.value).inc()
        self._count_loops(attempt.loops)
        if attempt.outcome not in (RevisionOutcome.ALLOWED, RevisionOutcome.REJECTED):
            logger.info(
                "no revision on %s: %s %s", tier.name, attempt.outcome.value, attempt.detail
            )
        if self.on_revision is not None:
            self.on_revision(request, attempt)
        return attempt

    def _count_loops(self, loops: list[LoopReport]) -> None:
        for loop in loops:
            self.metrics.loops.labels(loop.tier, loop.kind, loop.action).inc()

    def _answer(
        self,
        request_id: str,
        outcome: Outcome,
        start: float,
        budget_ms: int,
        info: RouteInfo,
        signals: list[InjectionSignal],
        attempt: RevisionAttempt | None = None,
    ) -> EvaluateResponse:
        answer, gen, tier = outcome.answer, outcome.generation, outcome.tier
        by_id = {item.id: item for item in outcome.built.evidence}
        decision, confidence = self._settle(outcome)
        rationale = answer.rationale
        revision: ProposedAction | None = None
        if signals and decision in (Decision.ALLOW, Decision.REVISE):
            # text in the request argued with the judge: whatever the model made of it, a
            # human decides (a revision would be the model's action, written under its sway)
            self.metrics.injection_capped.labels(tier.name, decision.value).inc()
            places = ", ".join(sorted({s.place for s in signals}))
            rationale = (
                f"Escalated: the request holds text aimed at the judge ({places}); the model "
                f"said {decision.value}. {rationale}"
            ).strip()
            if decision == Decision.ALLOW:
                confidence = 1.0 - confidence
            decision = Decision.ESCALATE
        if decision == Decision.REVISE:
            # the model's own revision is free text that nothing has read: never offered
            decision = Decision.DENY
        if attempt is not None and attempt.offered and decision != Decision.ALLOW:
            decision, revision = Decision.REVISE, attempt.action
            rationale = f"{rationale} The revision is what the judge allows instead.".strip()
        timing = Timing(
            queue_ms=outcome.queue_s * 1000,
            prefill_ms=gen.prefill_s * 1000,
            decode_ms=gen.decode_s * 1000,
            total_ms=(time.monotonic() - start) * 1000,
            revise_ms=attempt.seconds * 1000 if attempt is not None else 0.0,
        )
        response = EvaluateResponse(
            request_id=request_id,
            decision=decision,
            confidence=min(1.0, max(0.0, confidence)),
            evidence=[by_id[i] for i in answer.evidence],
            cited_history=list(answer.history),
            rationale=rationale,
            revision=revision,
            revision_rejected=attempt is not None and attempt.rejected,
            tier=tier.name,
            model=tier.model,
            trimmed=outcome.built.trimmed,
            route=info,
            loops=outcome.loops + (attempt.loops if attempt is not None else []),
            timing=timing,
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens),
            decided_by="probe" if outcome.decided_by == "probe" else "generation",
            injection=signals,
        )
        self._observe(tier.name, response, budget_ms)
        return response

    def _fail_closed(
        self,
        request_id: str,
        tier: Tier,
        fault: FailClosed,
        start: float,
        budget_ms: int,
        info: RouteInfo,
        signals: list[InjectionSignal] | None = None,
    ) -> EvaluateResponse:
        logger.warning(
            "fail-closed",
            extra={
                "request_id": request_id,
                "tier": tier.name,
                "reason": fault.reason.value,
                "detail": fault.detail,
            },
        )
        response = EvaluateResponse(
            request_id=request_id,
            decision=Decision(self.settings.fail_closed_decision),
            confidence=0.0,
            rationale=f"Fail-closed ({fault.reason.value}): {fault.detail}"[:500],
            tier=tier.name,
            model=tier.model,
            degraded=True,
            reason=fault.reason,
            route=info,
            loops=fault.loops,
            timing=Timing(total_ms=(time.monotonic() - start) * 1000),
            decided_by="none",
            injection=signals or [],
        )
        self.metrics.fail_closed.labels(tier.name, fault.reason.value).inc()
        self._observe(tier.name, response, budget_ms)
        return response

    def _observe(self, tier: str, response: EvaluateResponse, budget_ms: int) -> None:
        m = self.metrics
        if response.timing.total_ms > budget_ms:
            m.budget_misses.labels(tier).inc()
        m.requests.labels(tier, response.decision.value, str(response.degraded).lower()).inc()
        m.decided_by.labels(tier, response.decided_by).inc()
        t = response.timing
        for stage, ms in (
            ("queue", t.queue_ms),
            ("prefill", t.prefill_ms),
            ("decode", t.decode_ms),
            ("total", t.total_ms),
        ):
            m.stage_seconds.labels(tier, stage).observe(ms / 1000)
