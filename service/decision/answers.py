"""From what a tier read to the answer the gate gives: the threshold policy on P(allow), the
confidence, the caps (the injection tripwire, an unchecked revision), the response itself,
and the metrics every answer records, here and nowhere else. Pure logic on an outcome."""

from __future__ import annotations

import logging

from service.backends.base import ChoicePolicy
from service.decision.budget import Admission
from service.decision.generation import FailClosed, Outcome
from service.decision.revision import RevisionAttempt
from service.ops.telemetry import Metrics
from service.schemas import (
    Decision,
    EvaluateResponse,
    InjectionSignal,
    ProposedAction,
    RouteInfo,
    Timing,
    Usage,
)

logger = logging.getLogger(__name__)


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


def settle(outcome: Outcome, tier_threshold: float) -> tuple[Decision, float]:
    """The decision and its confidence, an allow held to the path's threshold (the probe's
    own, else the tier's): an engine that picks the decision itself (a remote one) meets the
    same bar as one whose decision we force from the logits."""
    decision = outcome.answer.decision
    confidence = confidence_of(decision, outcome.generation.choice_probs)
    threshold = outcome.allow_at if outcome.allow_at is not None else tier_threshold
    if decision == Decision.ALLOW and confidence < threshold:
        decision, confidence = Decision.ESCALATE, 1.0 - confidence
    return decision, confidence


def _capped(
    decision: Decision,
    confidence: float,
    rationale: str,
    signals: list[InjectionSignal],
    attempt: RevisionAttempt | None,
) -> tuple[Decision, float, str, ProposedAction | None]:
    """The caps on what the model said: text that argued with the judge sends an allow (or
    the model's revise) to a human; the model's own free-text revision is never offered; a
    checked revision the judge allows turns an unsafe verdict into `revise`."""
    revision: ProposedAction | None = None
    if signals and decision in (Decision.ALLOW, Decision.REVISE):
        # whatever the model made of it, a human decides (a revision would be the model's
        # action, written under its sway)
        places = ", ".join(sorted({s.place for s in signals}))
        rationale = (
            f"Escalated: the request holds text aimed at the judge ({places}); the model "
            f"said {decision.value}. {rationale}"
        ).strip()
        if decision == Decision.ALLOW:
            confidence = 1.0 - confidence
        decision = Decision.ESCALATE
    if decision == Decision.REVISE:
        decision = Decision.DENY  # free text that nothing has read
    if attempt is not None and attempt.offered and decision != Decision.ALLOW:
        decision, revision = Decision.REVISE, attempt.action
        rationale = f"{rationale} The revision is what the judge allows instead.".strip()
    return decision, confidence, rationale, revision


def answer(
    admission: Admission,
    outcome: Outcome,
    info: RouteInfo,
    signals: list[InjectionSignal],
    attempt: RevisionAttempt | None,
    *,
    tier_threshold: float,
    metrics: Metrics,
) -> EvaluateResponse:
    """The response for a tier's answer."""
    said, gen, tier = outcome.answer, outcome.generation, outcome.tier
    by_id = {item.id: item for item in outcome.built.evidence}
    settled, confidence = settle(outcome, tier_threshold)
    decision, confidence, rationale, revision = _capped(
        settled, confidence, said.rationale, signals, attempt
    )
    if signals and settled in (Decision.ALLOW, Decision.REVISE):
        metrics.injection_capped.labels(tier.name, settled.value).inc()
    response = EvaluateResponse(
        request_id=admission.request_id,
        decision=decision,
        confidence=min(1.0, max(0.0, confidence)),
        evidence=[by_id[i] for i in said.evidence],
        cited_history=list(said.history),
        rationale=rationale,
        revision=revision,
        revision_rejected=attempt is not None and attempt.rejected,
        tier=tier.name,
        model=tier.model,
        trimmed=outcome.built.trimmed,
        route=info,
        loops=outcome.loops + (attempt.loops if attempt is not None else []),
        timing=Timing(
            queue_ms=outcome.queue_s * 1000,
            prefill_ms=gen.prefill_s * 1000,
            decode_ms=gen.decode_s * 1000,
            total_ms=admission.budget.elapsed_ms(),
            revise_ms=attempt.seconds * 1000 if attempt is not None else 0.0,
        ),
        usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens),
        decided_by="probe" if outcome.decided_by == "probe" else "generation",
        injection=signals,
    )
    observe(metrics, tier.name, response, admission)
    return response


def fail_closed(
    admission: Admission,
    tier: str,
    model: str | None,
    fault: FailClosed,
    info: RouteInfo,
    signals: list[InjectionSignal] | None,
    *,
    decision: Decision,
    metrics: Metrics,
) -> EvaluateResponse:
    """The response when no usable answer came: `decision` (escalate or deny), degraded."""
    logger.warning(
        "fail-closed",
        extra={
            "request_id": admission.request_id,
            "tier": tier,
            "reason": fault.reason.value,
            "detail": fault.detail,
        },
    )
    response = EvaluateResponse(
        request_id=admission.request_id,
        decision=decision,
        confidence=0.0,
        rationale=f"Fail-closed ({fault.reason.value}): {fault.detail}"[:500],
        tier=tier,
        model=model,
        degraded=True,
        reason=fault.reason,
        route=info,
        loops=fault.loops,
        timing=Timing(total_ms=admission.budget.elapsed_ms()),
        decided_by="none",
        injection=signals or [],
    )
    metrics.fail_closed.labels(tier, fault.reason.value).inc()
    observe(metrics, tier, response, admission)
    return response


def observe(metrics: Metrics, tier: str, response: EvaluateResponse, admission: Admission) -> None:
    """The metrics of one answer, the budget's among them: recorded once per response."""
    m, budget_ms = metrics, admission.budget.total_ms
    t = response.timing
    if t.total_ms > budget_ms:
        m.budget_misses.labels(tier).inc()
    m.budget_used.labels(tier).observe(t.total_ms / budget_ms)
    m.requests.labels(tier, response.decision.value, str(response.degraded).lower()).inc()
    m.decided_by.labels(tier, response.decided_by).inc()
    for stage, ms in (
        ("queue", t.queue_ms),
        ("prefill", t.prefill_ms),
        ("decode", t.decode_ms),
        ("total", t.total_ms),
    ):
        m.stage_seconds.labels(tier, stage).observe(ms / 1000)
