"""Generation on one tier: build the prompt and constraint, generate with the loop detector and
the completeness check on every token, verify, and re-ask once (with anti-repetition sampling
after a loop) when the output is unusable and the budget allows. Framework-free; runs on the
tier's worker thread, or on the event loop for a tier that serves many at once."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any, NoReturn

from service.backends.base import (
    ChoicePolicy,
    ConcurrentBackend,
    Finish,
    Generation,
    GenerationRequest,
)
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.prompt import (
    BuiltPrompt,
    ContextOverflowError,
    build_prompt,
)
from service.decision.revision import RevisionAttempt
from service.decision.tiers import Tier
from service.decision.verify import InvalidAnswerError, ModelAnswer, is_complete, parse_answer
from service.errors import (
    BackendError,
    BackendOverloadedError,
    ReplicaLostError,
)
from service.guards.loops import LoopDetector, LoopVerdict
from service.ops.telemetry import Metrics
from service.schemas import (
    DegradedReason,
    EvaluateRequest,
    EvidenceItem,
    LoopAction,
    LoopReport,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

# Anti-repetition sampling for the retry after a loop: penalties on tokens already generated,
# and enough temperature to leave the greedy attractor.
_LOOP_RETRY: dict[str, Any] = {
    "temperature": 0.7,
    "repeat_penalty": 1.3,
    "presence_penalty": 0.5,
    "frequency_penalty": 0.5,
}
_INVALID_RETRY: dict[str, Any] = {"temperature": 0.7}


class FailClosed(Exception):
    def __init__(
        self, reason: DegradedReason, detail: str, loops: list[LoopReport] | None = None
    ) -> None:
        super().__init__(detail)
        self.reason = reason
        self.detail = detail
        self.loops = loops or []


class LoopFailure(Exception):
    """Every attempt this tier could afford looped; the caller may try another tier."""

    def __init__(self, loops: list[LoopReport]) -> None:
        super().__init__(f"{len(loops)} loop(s)")
        self.loops = loops


@dataclass
class Outcome:
    tier: Tier
    answer: ModelAnswer
    built: BuiltPrompt
    generation: Generation
    queue_s: float
    loops: list[LoopReport] = field(default_factory=list)
    decided_by: str = "generation"
    allow_at: float | None = None  # the least P(allow) for an allow on this path (None: tier's)
    # the revision step, when it ran in the same worker job as the decision (`revised`)
    revision: RevisionAttempt | None = None
    revised: bool = False


def _report(tier: Tier, verdict: LoopVerdict, action: LoopAction) -> LoopReport:
    return LoopReport(
        tier=tier.name,
        kind=verdict.kind.value,
        at_token=verdict.at_token,
        detail=verdict.detail,
        action=action,
    )


def build_on_tier(
    tier: Tier,
    request: EvaluateRequest,
    evidence: list[EvidenceItem],
    settings: Settings,
    max_prompt_tokens: int | None,
    *,
    roll_call: bool = False,
) -> BuiltPrompt:
    backend = tier.backend
    assert backend is not None
    limits = tier.settings
    try:
        return build_prompt(
            request,
            evidence,
            count_tokens=backend.count_tokens,
            max_prompt_tokens=min(
                backend.context_size - limits.max_tokens, max_prompt_tokens or 1 << 30
            ),
            max_turn_chars=settings.max_turn_chars,
            roll_call=roll_call,
        )
    except ContextOverflowError as exc:
        shrunk = max_prompt_tokens is not None and max_prompt_tokens < backend.context_size
        reason = DegradedReason.BUDGET_INFEASIBLE if shrunk else DegradedReason.INPUT_TOO_LONG
        raise FailClosed(reason, str(exc)) from exc
    except BackendError as exc:
        raise FailClosed(DegradedReason.MODEL_ERROR, exc.message) from exc


def _shape(tier: Tier, built: BuiltPrompt, request: EvaluateRequest) -> AnswerShape:
    return AnswerShape(
        evidence_ids=tuple(item.id for item in built.evidence),
        history_ids=built.history_ids,
        max_cited=tier.settings.max_cited,
        rationale_chars=tier.settings.rationale_chars,
        revision_chars=tier.settings.revision_chars,
        explain=request.explain,
    )


def run_on_tier(
    tier: Tier,
    request: EvaluateRequest,
    evidence: list[EvidenceItem],
    deadline: float,
    queue_s: float,
    *,
    settings: Settings,
    choose: ChoicePolicy,
    metrics: Metrics,
    max_prompt_tokens: int | None = None,
) -> Outcome:
    """The decision, citations and rationale by constrained generation."""
    built = build_on_tier(tier, request, evidence, settings, max_prompt_tokens)
    shape = _shape(tier, built, request)
    answer, generation, loops = generate_answer(
        tier, built, shape, choose, deadline, settings=settings, metrics=metrics
    )
    return Outcome(tier, answer, built, generation, queue_s, loops)


async def arun_on_tier(
    tier: Tier,
    request: EvaluateRequest,
    evidence: list[EvidenceItem],
    deadline: float,
    queue_s: float,
    *,
    settings: Settings,
    choose: ChoicePolicy,
    metrics: Metrics,
    max_prompt_tokens: int | None = None,
) -> Outcome:
    """`run_on_tier` on the event loop, for a tier whose engine serves many at once (its
    token count is an estimate from characters: building the prompt costs no engine call)."""
    built = build_on_tier(tier, request, evidence, settings, max_prompt_tokens)
    backend = tier.backend
    assert isinstance(backend, ConcurrentBackend)
    attempts = _Attempts(
        tier, built, _shape(tier, built, request), choose, deadline, settings, metrics
    )
    while (generation_request := attempts.next()) is not None:
        try:
            generation = await backend.agenerate(generation_request, attempts.on_token)
        except BackendError as exc:
            attempts.failed(exc)
            continue
        done = attempts.settle(generation)
        if done is not None:
            return Outcome(tier, done[0], built, done[1], queue_s, done[2])
    attempts.give_up()


def generate_answer(
    tier: Tier,
    built: BuiltPrompt,
    shape: AnswerShape,
    choose: ChoicePolicy,
    deadline: float,
    *,
    settings: Settings,
    metrics: Metrics,
) -> tuple[ModelAnswer, Generation, list[LoopReport]]:
    """Generate under the shape's grammar with the loop detector and the completeness check on
    every token, verify, and re-ask once when the output is unusable and the budget allows."""
    backend = tier.backend
    assert backend is not None
    attempts = _Attempts(tier, built, shape, choose, deadline, settings, metrics)
    while (request := attempts.next()) is not None:
        try:
            generation = backend.generate(request, attempts.on_token)
        except BackendError as exc:
            attempts.failed(exc)
            continue
        done = attempts.settle(generation)
        if done is not None:
            return done
    attempts.give_up()


# A replica lost mid-answer is resent (to another replica) at most this often per request.
_MAX_RESENDS = 2


class _Attempts:
    """The attempts of one generation, for either transport: `next` gives the request to send
    (None when none is left), `on_token` watches each piece (a fresh loop detector per
    attempt), `settle` verifies what came back (the answer, or None to go on), `failed`
    books an engine error, `give_up` raises what the last attempt left."""

    def __init__(
        self,
        tier: Tier,
        built: BuiltPrompt,
        shape: AnswerShape,
        choose: ChoicePolicy,
        deadline: float,
        settings: Settings,
        metrics: Metrics,
    ) -> None:
        self.tier, self.built, self.shape = tier, built, shape
        self.choose, self.deadline = choose, deadline
        self.settings, self.metrics = settings, metrics
        self.constraint = build_constraint(shape)
        self.loops: list[LoopReport] = []
        self.attempt = -1
        self.resends = 0
        self._resend = False
        self.last_error, self.last_took, self.last_failure = "no attempt", 0.0, "invalid"
        self.sampling: dict[str, Any] = {"temperature": tier.settings.temperature}
        self.detector = LoopDetector(settings.loops)
        self.text = RESPONSE_PREFIX
        self.started = 0.0

    def next(self) -> GenerationRequest | None:
        self.started = time.monotonic()
        if self._resend:
            self._resend = False  # the same attempt again, on another replica
        else:
            self.attempt += 1
            if self.attempt >= (2 if self.settings.retry_once else 1):
                return None
            if self.attempt and self.deadline - self.started < self.last_took:
                return None  # a second try would not finish in time
            if self.attempt and self.last_failure == "loop":
                self.loops[-1].action = "retry"
        self.detector = LoopDetector(self.settings.loops)
        self.detector.feed(-1, RESPONSE_PREFIX)  # the detector reads the answer from its start
        self.text = RESPONSE_PREFIX
        return GenerationRequest(
            prompt=self.built.prompt,
            constraint=self.constraint,
            max_tokens=self.tier.settings.max_tokens,
            deadline=self.deadline,
            seed=self.attempt,
            choose=self.choose,
            **self.sampling,
        )

    def on_token(self, token: int, piece: str) -> bool:
        self.text += piece
        if self.detector.feed(token, piece) is not None:
            return True
        return is_complete(self.text)  # stop at the closing brace, not one token later

    def failed(self, exc: BackendError) -> None:
        """Resend after a lost replica while the budget lasts; anything else fails closed."""
        if (
            isinstance(exc, ReplicaLostError)
            and self.resends < _MAX_RESENDS
            and time.monotonic() < self.deadline
        ):
            self.resends += 1
            self._resend = True
            logger.warning("resending on %s: %s", self.tier.name, exc.message)
            return
        reason = (
            DegradedReason.OVERLOADED
            if isinstance(exc, BackendOverloadedError)
            else DegradedReason.MODEL_ERROR
        )
        raise FailClosed(reason, exc.message, self.loops) from exc

    def settle(
        self, generation: Generation
    ) -> tuple[ModelAnswer, Generation, list[LoopReport]] | None:
        tier, metrics = self.tier, self.metrics
        self.last_took = time.monotonic() - self.started
        tier.observe(generation)
        metrics.tokens.labels(tier.name, "prompt").inc(generation.prompt_tokens)
        metrics.tokens.labels(tier.name, "completion").inc(generation.completion_tokens)
        metrics.engine_concurrency.labels(tier.name).observe(generation.concurrency)
        if self.detector.verdict is not None:
            # the action is settled by whoever acts on it: a retry here, or the caller
            self.loops.append(_report(tier, self.detector.verdict, "fail_closed"))
            logger.warning("loop on %s: %s", tier.name, self.detector.verdict.detail)
            self.sampling, self.last_failure = dict(_LOOP_RETRY), "loop"
            return None
        if generation.finish == Finish.DEADLINE:
            raise FailClosed(
                DegradedReason.DEADLINE, "generation stopped at the deadline", self.loops
            )
        try:
            answer = parse_answer(RESPONSE_PREFIX + generation.text, self.shape)
        except InvalidAnswerError as exc:
            metrics.invalid_outputs.labels(tier.name).inc()
            self.last_error = str(exc)
            logger.warning(
                "invalid output from %s (finish %s): %s", tier.name, generation.finish, exc
            )
            self.sampling, self.last_failure = dict(_INVALID_RETRY), "invalid"
            return None
        return answer, generation, self.loops

    def give_up(self) -> NoReturn:
        if self.last_failure == "loop":
            raise LoopFailure(self.loops)
        raise FailClosed(DegradedReason.INVALID_OUTPUT, self.last_error, self.loops)
