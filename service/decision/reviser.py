"""The revision step, framework-free: after an unsafe verdict, one short generation of a
safer action of the same shape (service.decision.revision), then one read of it by the same judge as
a new proposed action in the same context. Only a revision the judge would allow is offered.

It runs on the tier's worker thread, after the decision, and knows nothing of how the
decision was read: the caller hands it the judge as a function of a request. Every fault
ends in an attempt that offers nothing, so the original (fail-closed) decision stands."""

from __future__ import annotations

import logging
import time
from collections.abc import Callable

from service.backends.base import Finish, Generation, GenerationRequest, Prompt
from service.decision.generation import FailClosed, LoopFailure, Outcome
from service.decision.prompt import estimate_tokens
from service.decision.revision import (
    InvalidRevisionError,
    RevisionAttempt,
    RevisionOutcome,
    RevisionPlan,
    parse_revision,
    plan_revision,
    revision_prompt,
)
from service.decision.tiers import Tier
from service.decision.verify import is_complete
from service.errors import BackendError
from service.guards.injection import scan
from service.guards.loops import LoopDetector
from service.ops.telemetry import Metrics
from service.schemas import (
    Decision,
    DegradedReason,
    EvaluateRequest,
    LoopReport,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

# The judge's read of the revised action answers with the decision alone: at most this many
# tokens when generation decides (none when a probe does).
_READ_TOKENS = 8
RESERVE_S = 0.02  # kept back for the response itself


# The judge: the decision (after the tier's allow threshold) and its confidence for a
# request, read the way the tier reads every request.
Judge = Callable[[EvaluateRequest], tuple[Decision, float]]


def unsafe_verdict(decision: Decision, p_allow: float | None) -> bool:
    """A verdict a revision answers: deny, the model's own revise, or an escalate that leans
    unsafe (P(allow) below one half; without probabilities an escalate does not lean)."""
    if decision in (Decision.DENY, Decision.REVISE):
        return True
    return decision == Decision.ESCALATE and p_allow is not None and p_allow < 0.5


def revise_on_tier(
    tier: Tier,
    request: EvaluateRequest,
    outcome: Outcome,
    decision: Decision,
    deadline: float,
    *,
    judge: Judge,
    settings: Settings,
    metrics: Metrics,
) -> RevisionAttempt:
    """Generate one revision of the request's action and have `judge` read it; never
    raises."""
    started = time.monotonic()
    generated = False
    try:
        limits = tier.settings
        plan = plan_revision(request.action, limits.revision_chars)
        by_id = {item.id: item for item in outcome.built.evidence}
        cited = [by_id[i] for i in outcome.answer.evidence if i in by_id]
        judged = outcome.built.without_roll_call().prompt
        prompt = revision_prompt(judged, decision, cited, plan, limits.revision_chars)
        max_tokens = plan.max_tokens(limits.max_tokens)
        # What the KV cache does not hold: the verdict and the ask (the judge's prompt is
        # there, unless another request ran in between), then the revised action for the read.
        tail = sum(len(m.content) for m in prompt.messages[len(judged.messages) :])
        q = settings.latency_quantile
        needed = tier.latency.seconds_for(
            estimate_tokens(tail), max_tokens, quantile=q
        ) + tier.latency.seconds_for(
            estimate_tokens(plan.max_chars) + 16,
            0 if tier.probes is not None else _READ_TOKENS,
            quantile=q,
        )
        if time.monotonic() + needed > deadline - RESERVE_S:
            attempt = RevisionAttempt(RevisionOutcome.NO_BUDGET, detail=f"needs ~{needed:.2f} s")
        else:
            generated = True
            attempt = _generate_and_read(
                tier, request, plan, prompt, max_tokens, deadline, judge, settings, metrics
            )
    except Exception as exc:  # our own bug: the original decision stands
        logger.exception("revision step failed", extra={"request_id": request.request_id})
        attempt = RevisionAttempt(RevisionOutcome.FAULT, detail=f"{type(exc).__name__}")
    attempt.generated = generated
    attempt.seconds = time.monotonic() - started
    return attempt


def _generate_and_read(
    tier: Tier,
    request: EvaluateRequest,
    plan: RevisionPlan,
    prompt: Prompt,
    max_tokens: int,
    deadline: float,
    judge: Judge,
    settings: Settings,
    metrics: Metrics,
) -> RevisionAttempt:
    backend = tier.backend
    assert backend is not None
    detector = LoopDetector(settings.loops)
    detector.feed(-1, plan.prefix)
    text = plan.prefix

    def on_token(token: int, piece: str) -> bool:
        nonlocal text
        text += piece
        if detector.feed(token, piece) is not None:
            return True
        return is_complete(text)

    try:
        generation = backend.generate(
            GenerationRequest(
                prompt=prompt,
                constraint=plan.constraint,
                max_tokens=max_tokens,
                deadline=deadline - RESERVE_S,
                temperature=tier.settings.temperature,
            ),
            on_token,
        )
    except BackendError as exc:
        return RevisionAttempt(RevisionOutcome.FAULT, detail=exc.message)
    tier.observe(generation)
    metrics.tokens.labels(tier.name, "prompt").inc(generation.prompt_tokens)
    metrics.tokens.labels(tier.name, "completion").inc(generation.completion_tokens)
    attempt = _attempt_after(generation, request, plan, detector, tier, judge, settings)
    attempt.generate_s = generation.prefill_s + generation.decode_s
    attempt.evaluated_tokens = generation.prompt_tokens - generation.cached_tokens
    attempt.completion_tokens = generation.completion_tokens
    attempt.text = generation.text
    return attempt


def _attempt_after(
    generation: Generation,
    request: EvaluateRequest,
    plan: RevisionPlan,
    detector: LoopDetector,
    tier: Tier,
    judge: Judge,
    settings: Settings,
) -> RevisionAttempt:
    """What the generation gave: a loop, a revision of the wrong shape or none, or one the
    judge reads."""
    if detector.verdict is not None:
        verdict = detector.verdict
        report = LoopReport(
            tier=tier.name,
            kind=verdict.kind.value,
            at_token=verdict.at_token,
            detail=f"revision: {verdict.detail}",
            action="fail_closed",
        )
        return RevisionAttempt(RevisionOutcome.LOOP, detail=verdict.detail, loops=[report])
    if generation.finish == Finish.DEADLINE:
        return RevisionAttempt(RevisionOutcome.NO_BUDGET, detail="generation hit the deadline")
    try:
        revised = parse_revision(plan.prefix + generation.text, plan)
    except InvalidRevisionError as exc:
        return RevisionAttempt(RevisionOutcome.INVALID, detail=str(exc))
    if revised == request.action:
        return RevisionAttempt(RevisionOutcome.UNCHANGED, action=revised)
    candidate = request.model_copy(update={"action": revised, "explain": False})
    if settings.injection_tripwire and scan(candidate):
        # the model's own text argues with the judge: never offered, never read
        return RevisionAttempt(RevisionOutcome.TRIPWIRE, action=revised)
    try:
        verdict_on, confidence = judge(candidate)
    except LoopFailure as failure:
        return RevisionAttempt(
            RevisionOutcome.LOOP, action=revised, detail="the read looped", loops=failure.loops
        )
    except FailClosed as fault:
        kind = (
            RevisionOutcome.NO_BUDGET
            if fault.reason == DegradedReason.DEADLINE
            else RevisionOutcome.FAULT
        )
        return RevisionAttempt(kind, action=revised, detail=fault.detail, loops=fault.loops)
    allowed = verdict_on == Decision.ALLOW
    return RevisionAttempt(
        RevisionOutcome.ALLOWED if allowed else RevisionOutcome.REJECTED,
        action=revised,
        verdict=verdict_on,
        confidence=confidence,
    )
