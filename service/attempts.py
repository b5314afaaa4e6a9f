"""Generation on one tier: build the prompt and constraint, generate with the loop detector and
the completeness check on every token, verify, and re-ask once (with anti-repetition sampling
after a loop) when the output is unusable and the budget allows. Framework-free; runs on the
tier's worker thread."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from service.backends.base import ChoicePolicy, Finish, Generation, GenerationRequest
from service.errors import BackendError
from service.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.loops import LoopDetector, LoopVerdict
from service.prompt import BuiltPrompt, ContextOverflowError, build_prompt
from service.schemas import DegradedReason, EvaluateRequest, EvidenceItem, LoopAction, LoopReport
from service.settings import Settings
from service.telemetry import Metrics
from service.tiers import Tier
from service.verify import InvalidAnswerError, ModelAnswer, is_complete, parse_answer

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


def _report(tier: Tier, verdict: LoopVerdict, action: LoopAction) -> LoopReport:
    return LoopReport(
        tier=tier.name,
        kind=verdict.kind.value,
        at_token=verdict.at_token,
        detail=verdict.detail,
        action=action,
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
    backend = tier.backend
    assert backend is not None
    limits = tier.settings
    try:
        built = build_prompt(
            request,
            evidence,
            count_tokens=backend.count_tokens,
            max_prompt_tokens=min(
                backend.context_size - limits.max_tokens, max_prompt_tokens or 1 << 30
            ),
            max_turn_chars=settings.max_turn_chars,
        )
    except ContextOverflowError as exc:
        shrunk = max_prompt_tokens is not None and max_prompt_tokens < backend.context_size
        reason = DegradedReason.BUDGET_INFEASIBLE if shrunk else DegradedReason.INPUT_TOO_LONG
        raise FailClosed(reason, str(exc)) from exc
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
    loops: list[LoopReport] = []
    last_error, last_took, last_failure = "no attempt", 0.0, "invalid"
    sampling: dict[str, Any] = {"temperature": limits.temperature}
    for attempt in range(2 if settings.retry_once else 1):
        started = time.monotonic()
        if attempt and deadline - started < last_took:
            break  # a second try would not finish in time
        if attempt and last_failure == "loop":
            loops[-1].action = "retry"
        detector = LoopDetector(settings.loops)
        detector.feed(-1, RESPONSE_PREFIX)  # the detector reads the answer from its start
        text = RESPONSE_PREFIX

        def on_token(token: int, piece: str, detector: LoopDetector = detector) -> bool:
            nonlocal text
            text += piece
            if detector.feed(token, piece) is not None:
                return True
            return is_complete(text)  # stop at the closing brace, not one token later

        try:
            generation = backend.generate(
                GenerationRequest(
                    prompt=built.prompt,
                    constraint=constraint,
                    max_tokens=limits.max_tokens,
                    deadline=deadline,
                    seed=attempt,
                    choose=choose,
                    **sampling,
                ),
                on_token,
            )
        except BackendError as exc:
            raise FailClosed(DegradedReason.MODEL_ERROR, exc.message, loops) from exc
        last_took = time.monotonic() - started
        tier.observe(generation)
        metrics.tokens.labels(tier.name, "prompt").inc(generation.prompt_tokens)
        metrics.tokens.labels(tier.name, "completion").inc(generation.completion_tokens)
        if detector.verdict is not None:
            # the action is settled by whoever acts on it: a retry here, or the caller
            loops.append(_report(tier, detector.verdict, "fail_closed"))
            logger.warning("loop on %s: %s", tier.name, detector.verdict.detail)
            sampling, last_failure = dict(_LOOP_RETRY), "loop"
            continue
        if generation.finish == Finish.DEADLINE:
            raise FailClosed(DegradedReason.DEADLINE, "generation stopped at the deadline", loops)
        try:
            answer = parse_answer(RESPONSE_PREFIX + generation.text, shape)
        except InvalidAnswerError as exc:
            metrics.invalid_outputs.labels(tier.name).inc()
            last_error = str(exc)
            logger.warning(
                "invalid output from %s (finish %s): %s", tier.name, generation.finish, exc
            )
            sampling, last_failure = dict(_INVALID_RETRY), "invalid"
            continue
        return Outcome(tier, answer, built, generation, queue_s, loops)
    if last_failure == "loop":
        raise LoopFailure(loops)
    raise FailClosed(DegradedReason.INVALID_OUTPUT, last_error, loops)
