"""The decision pipeline, framework-free: the HTTP API, the CLI and the benchmarks all call
`Gatekeeper.evaluate`. Every fault on the decision path ends in a fail-closed answer."""

from __future__ import annotations

import asyncio
import logging
import time
import uuid
from dataclasses import dataclass

from service.backends.base import ChoicePolicy, Finish, Generation, GenerationRequest
from service.errors import BackendError
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.prompt import BuiltPrompt, ContextOverflowError, build_prompt
from service.schemas import (
    Decision,
    DegradedReason,
    EvaluateRequest,
    EvaluateResponse,
    EvidenceItem,
    TextAction,
    Timing,
    Usage,
)
from service.settings import Settings
from service.telemetry import Metrics
from service.tiers import QueueWaitExceededError, Tier, TierPool
from service.verify import InvalidAnswerError, ModelAnswer, is_complete, parse_answer

logger = logging.getLogger(__name__)

# Time kept back from the budget for verification and the response itself.
_RESPONSE_RESERVE_S = 0.02


def normalised(probs: dict[str, float]) -> dict[str, float]:
    total = sum(probs.values())
    return {k: v / total for k, v in probs.items()} if total > 0 else {}


def decision_policy(allow_threshold: float) -> ChoicePolicy:
    """The likeliest decision, except that an uncertain 'allow' goes to a human."""

    def choose(probs: dict[str, float]) -> str:
        p = normalised(probs)
        best = max(p, key=p.__getitem__)
        if best == Decision.ALLOW and p[best] < allow_threshold:
            return Decision.ESCALATE.value
        return best

    return choose


def confidence_of(decision: Decision, probs: dict[str, float]) -> float:
    """P(allow) for an allow, else P(not allow): the gate's own question, safe or not."""
    p_allow = normalised(probs).get(Decision.ALLOW.value)
    if p_allow is None:
        return 0.5  # the engine exposed no probabilities
    return p_allow if decision == Decision.ALLOW else 1.0 - p_allow


class FailClosed(Exception):
    def __init__(self, reason: DegradedReason, detail: str) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail


@dataclass
class _Outcome:
    answer: ModelAnswer
    built: BuiltPrompt
    generation: Generation
    queue_s: float


class Gatekeeper:
    def __init__(
        self, settings: Settings, pool: TierPool, policies: PolicyLibrary, metrics: Metrics
    ) -> None:
        self.settings = settings
        self.pool = pool
        self.policies = policies
        self.metrics = metrics
        self._choose = decision_policy(settings.allow_threshold)

    def validate(self, request: EvaluateRequest) -> None:
        """Client errors (4xx) are raised here, before any work is queued."""
        self.pool.get(request.tier or self.settings.default_tier)
        if request.policy is not None:
            self.policies.get(request.policy)

    def _evidence(self, request: EvaluateRequest) -> list[EvidenceItem]:
        supplied = list(request.evidence or [])
        if request.policy is None and request.evidence is not None:
            return supplied[: self.settings.max_prompt_evidence]
        pack = self.policies.get(request.policy or DEFAULT_PACK)
        taken = {item.id for item in supplied}
        merged = supplied + [item for item in pack.items if item.id not in taken]
        return merged[: self.settings.max_prompt_evidence]

    async def evaluate(self, request: EvaluateRequest) -> EvaluateResponse:
        start = time.monotonic()
        self.validate(request)
        request_id = request.request_id or uuid.uuid4().hex
        budget_ms = request.latency_budget_ms or self.settings.default_latency_budget_ms
        deadline = start + budget_ms / 1000.0
        tier = self.pool.get(request.tier or self.settings.default_tier)
        try:
            if tier.state != "loaded" or tier.backend is None:
                raise FailClosed(
                    DegradedReason.MODEL_UNAVAILABLE,
                    f"tier {tier.name} is {tier.state}"
                    + (f": {tier.detail}" if tier.detail else ""),
                )
            outcome = await self._run(tier, request, deadline)
        except FailClosed as fault:
            return self._fail_closed(request_id, tier, fault, start)
        return self._answer(request_id, tier, outcome, start)

    async def _run(self, tier: Tier, request: EvaluateRequest, deadline: float) -> _Outcome:
        evidence = self._evidence(request)
        self.metrics.queue_depth.labels(tier.name).set(tier.pending + 1)
        try:
            return await asyncio.wait_for(
                tier.run(
                    lambda queue_s: self._generate(tier, request, evidence, deadline, queue_s),
                    deadline,
                ),
                timeout=max(0.0, deadline - time.monotonic()) + _RESPONSE_RESERVE_S,
            )
        except (TimeoutError, QueueWaitExceededError) as exc:
            raise FailClosed(DegradedReason.DEADLINE, "the latency budget ran out") from exc
        finally:
            self.metrics.queue_depth.labels(tier.name).set(tier.pending)

    def _generate(
        self,
        tier: Tier,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        deadline: float,
        queue_s: float,
    ) -> _Outcome:
        """Runs on the tier's worker thread."""
        backend = tier.backend
        assert backend is not None
        limits = tier.settings
        try:
            built = build_prompt(
                request,
                evidence,
                count_tokens=backend.count_tokens,
                max_prompt_tokens=backend.context_size - limits.max_tokens,
                max_turn_chars=self.settings.max_turn_chars,
            )
        except ContextOverflowError as exc:
            raise FailClosed(DegradedReason.INPUT_TOO_LONG, str(exc)) from exc
        except BackendError as exc:
            raise FailClosed(DegradedReason.MODEL_ERROR, exc.message) from exc
        shape = AnswerShape(
            evidence_ids=tuple(item.id for item in built.evidence),
            history_ids=built.history_ids,
            max_cited=limits.max_cited,
            rationale_chars=limits.rationale_chars,
            revision_chars=limits.revision_chars,
            explain=request.explain,
        )
        constraint = build_constraint(shape)
        attempts = 2 if self.settings.retry_invalid_output else 1
        last_error = "no attempt"
        for attempt in range(attempts):
            text = RESPONSE_PREFIX

            def on_token(_token: int, piece: str) -> bool:
                nonlocal text
                text += piece
                return is_complete(text)  # stop at the closing brace, not one token later

            try:
                generation = backend.generate(
                    GenerationRequest(
                        prompt=built.prompt,
                        constraint=constraint,
                        max_tokens=limits.max_tokens,
                        deadline=deadline - _RESPONSE_RESERVE_S,
                        temperature=limits.temperature
                        if attempt == 0
                        else max(0.7, limits.temperature),
                        seed=attempt,
                        choose=self._choose,
                    ),
                    on_token,
                )
            except BackendError as exc:
                raise FailClosed(DegradedReason.MODEL_ERROR, exc.message) from exc
            self._count_tokens(tier, generation)
            if generation.finish == Finish.DEADLINE:
                raise FailClosed(DegradedReason.DEADLINE, "generation stopped at the deadline")
            try:
                answer = parse_answer(RESPONSE_PREFIX + generation.text, shape)
                return _Outcome(answer, built, generation, queue_s)
            except InvalidAnswerError as exc:
                self.metrics.invalid_outputs.labels(tier.name).inc()
                last_error = str(exc)
                logger.warning(
                    "invalid output from %s (attempt %d, finish %s): %s",
                    tier.name,
                    attempt + 1,
                    generation.finish,
                    last_error,
                )
        raise FailClosed(DegradedReason.INVALID_OUTPUT, last_error)

    def _count_tokens(self, tier: Tier, generation: Generation) -> None:
        self.metrics.tokens.labels(tier.name, "prompt").inc(generation.prompt_tokens)
        self.metrics.tokens.labels(tier.name, "completion").inc(generation.completion_tokens)

    def _answer(
        self, request_id: str, tier: Tier, outcome: _Outcome, start: float
    ) -> EvaluateResponse:
        answer, gen = outcome.answer, outcome.generation
        by_id = {item.id: item for item in outcome.built.evidence}
        confidence = confidence_of(answer.decision, gen.choice_probs)
        timing = Timing(
            queue_ms=outcome.queue_s * 1000,
            prefill_ms=gen.prefill_s * 1000,
            decode_ms=gen.decode_s * 1000,
            total_ms=(time.monotonic() - start) * 1000,
        )
        response = EvaluateResponse(
            request_id=request_id,
            decision=answer.decision,
            confidence=min(1.0, max(0.0, confidence)),
            evidence=[by_id[i] for i in answer.evidence],
            cited_history=list(answer.history),
            rationale=answer.rationale,
            revision=TextAction(text=answer.revision) if answer.revision else None,
            tier=tier.name,
            model=tier.model,
            trimmed=outcome.built.trimmed,
            timing=timing,
            usage=Usage(prompt_tokens=gen.prompt_tokens, completion_tokens=gen.completion_tokens),
        )
        self._observe(tier.name, response)
        return response

    def _fail_closed(
        self, request_id: str, tier: Tier, fault: FailClosed, start: float
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
            timing=Timing(total_ms=(time.monotonic() - start) * 1000),
        )
        self.metrics.fail_closed.labels(tier.name, fault.reason.value).inc()
        self._observe(tier.name, response)
        return response

    def _observe(self, tier: str, response: EvaluateResponse) -> None:
        m = self.metrics
        m.requests.labels(tier, response.decision.value, str(response.degraded).lower()).inc()
        t = response.timing
        for stage, ms in (
            ("queue", t.queue_ms),
            ("prefill", t.prefill_ms),
            ("decode", t.decode_ms),
            ("total", t.total_ms),
        ):
            m.stage_seconds.labels(tier, stage).observe(ms / 1000)
