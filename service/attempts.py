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
    HiddenStateReader,
    HiddenStates,
)
from service.errors import (
    BackendDeadlineError,
    BackendError,
    BackendOverloadedError,
    ReplicaLostError,
)
from service.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.loops import LoopDetector, LoopVerdict
from service.probes import ProbeSet, cite
from service.prompt import (
    PROFILE_HEADER,
    ROLL_CALL_HEADER,
    BuiltPrompt,
    ContextOverflowError,
    build_prompt,
)
from service.schemas import (
    Decision,
    DegradedReason,
    EvaluateRequest,
    EvidenceItem,
    LoopAction,
    LoopReport,
)
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
    decided_by: str = "generation"
    allow_at: float | None = None  # the least P(allow) for an allow on this path (None: tier's)


def _report(tier: Tier, verdict: LoopVerdict, action: LoopAction) -> LoopReport:
    return LoopReport(
        tier=tier.name,
        kind=verdict.kind.value,
        at_token=verdict.at_token,
        detail=verdict.detail,
        action=action,
    )


def _build(
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
    built = _build(tier, request, evidence, settings, max_prompt_tokens)
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
    built = _build(tier, request, evidence, settings, max_prompt_tokens)
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


def probe_decision(probes: ProbeSet, p_unsafe: float) -> Decision:
    if p_unsafe <= probes.allow_below:
        return Decision.ALLOW
    if p_unsafe >= probes.deny_above:
        return Decision.DENY
    return Decision.ESCALATE


def run_probe_on_tier(
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
    """The decision and the cited evidence from the tier's probes after one prefill; then,
    when the request asks for an explanation and the budget allows, the rationale (and the
    revision, if any) by constrained generation with the decision fixed. The prompt is
    already in the KV cache, so that generation starts decoding at once. A probe that reads
    the action's mean decides before the roll-call: that prefill stops at its header, and
    goes on through the roll-call only for a deny or escalate, which cite.

    When the probe would allow a request whose hidden state lies outside its training data
    (the guard), it abstains and generation decides, under `choose` and the same deadline:
    far from its data the probe's P(unsafe) means nothing (it said 0.000 to `rm -rf` of a
    photo folder). A deny or escalate out there stands: it can only make the answer
    stricter, and generation would cost a decode to loosen it."""
    backend, probes = tier.backend, tier.probes
    assert isinstance(backend, HiddenStateReader) and probes is not None
    built = _build(tier, request, evidence, settings, max_prompt_tokens, roll_call=True)
    # An action-mean probe decides from a prefill that stops before the roll-call; the
    # roll-call (a line per evidence item, ~15 tokens each) is read only when there is
    # something to cite that the item probe does not know, so an allow, and a deny among the
    # pack's own rules, cost no more prefill than generation's prompt.
    split = probes.decides_before_roll_call and bool(built.marks)
    items = probes.items_for(built.evidence)

    def read(**kwargs: Any) -> HiddenStates:
        try:
            return backend.hidden_states(built.prompt, deadline=deadline, **kwargs)
        except BackendDeadlineError as exc:
            raise FailClosed(
                DegradedReason.DEADLINE, "the prefill stopped at the deadline"
            ) from exc
        except BackendError as exc:
            raise FailClosed(DegradedReason.MODEL_ERROR, exc.message) from exc

    # When nothing will be generated on this prompt (no explanation asked, the pack's rules
    # cited from the same vector), the request's own tokens need to go only as deep as the
    # probes read: the blocks above are skipped. An abstention then prefills them again.
    shallow = split and items is not None and not request.explain
    states = read(
        layers=probes.decision_layers if split else probes.layers,
        marks=() if split else built.marks,
        span=probes.decision_span(bool(built.marks)),
        until=ROLL_CALL_HEADER if split else None,
        shallow_after=PROFILE_HEADER if shallow else None,
    )
    prefill = Generation(
        text="",
        finish=Finish.STOP,
        prompt_tokens=states.prompt_tokens,
        cached_tokens=states.cached_tokens,
        prefill_s=states.prefill_s,
    )
    at = {layer: k for k, layer in enumerate(states.layers)}
    rows = probes.decision_rows(states)
    score = float(probes.decision.score(rows[at[probes.decision.layer]]))
    p_unsafe = float(probes.decision.prob(rows[at[probes.decision.layer]]))
    decision = probe_decision(probes, p_unsafe)
    reading = probes.guard.read(rows[at[probes.guard.layer]], score)
    abstain = decision == Decision.ALLOW and not reading.inside
    tier.note_probe(abstained=abstain)
    relevance_probe = probes.relevance
    ids = [item.id for item in built.evidence]
    applies: tuple[Any, float] | None = None  # P(applies) per item, and the threshold
    rolled = not split  # whether the roll-call is in the KV cache
    if decision != Decision.ALLOW and ids:
        if items is not None:
            applies = items.probs(rows[at[items.layer]], built.evidence), items.threshold
        elif relevance_probe is not None:
            if split:  # the roll-call, from where the first prefill stopped
                marked = read(layers=(relevance_probe.layer,), marks=built.marks)
                roll_call = marked.marks[0]
                prefill.prompt_tokens = marked.prompt_tokens
                prefill.prefill_s += marked.prefill_s
                rolled = True
            else:
                roll_call = states.marks[at[relevance_probe.layer]]
            applies = relevance_probe.prob(roll_call), probes.relevance_threshold
    if not shallow:  # a shallow prefill is faster than the generation path's: routing would
        tier.observe(prefill)  # learn too low a cost for the requests that generate
    metrics.tokens.labels(tier.name, "prompt").inc(prefill.prompt_tokens)
    if abstain:
        metrics.probe_abstentions.labels(tier.name).inc()
        logger.info(
            "probe on %s abstains (distance %.1f, residual %.1f, score %.1f): generation decides",
            tier.name,
            reading.distance,
            reading.residual,
            score,
        )
        return run_on_tier(
            tier,
            request,
            evidence,
            deadline,
            queue_s,
            settings=settings,
            choose=choose,
            metrics=metrics,
            max_prompt_tokens=max_prompt_tokens,
        )
    cited = [] if applies is None else cite(applies[0], ids, applies[1], tier.settings.max_cited)
    prefill.choice_probs = {Decision.ALLOW.value: 1.0 - p_unsafe, Decision.DENY.value: p_unsafe}
    answer = ModelAnswer(
        decision=decision,
        evidence=cited,
        rationale=(
            f"Probe on layer {probes.decision.layer}: P(unsafe) = {p_unsafe:.2f}"
            + (f"; applicable: {', '.join(cited)}" if cited else "")
            + ("" if reading.inside else "; the request is unlike the probe's training data")
            + "."
        ),
    )
    outcome = Outcome(
        tier, answer, built, prefill, queue_s, decided_by="probe", allow_at=1 - probes.allow_below
    )
    limits = tier.settings
    rationale_tokens = limits.rationale_chars // 3 + 16
    if (
        not request.explain
        or time.monotonic()
        + tier.latency.predict(0, rationale_tokens, quantile=settings.latency_quantile)
        >= deadline
    ):
        return outcome
    shape = AnswerShape(
        evidence_ids=(),  # the probe cites; generation explains
        history_ids=built.history_ids,
        max_cited=limits.max_cited,
        rationale_chars=limits.rationale_chars,
        revision_chars=limits.revision_chars,
    )
    try:
        explained, generation, loops = generate_answer(
            tier,
            # an allow read before the roll-call is explained without it: it is not in the
            # KV cache, and the rationale does not need it
            built if rolled else built.without_roll_call(),
            shape,
            lambda _probs: decision.value,
            deadline,
            settings=settings,
            metrics=metrics,
        )
    except LoopFailure as failure:  # the decision stands; only its explanation failed
        outcome.loops = failure.loops
        return outcome
    except FailClosed as fault:
        outcome.loops = fault.loops
        logger.info("no rationale after the probe on %s: %s", tier.name, fault.detail)
        return outcome
    outcome.answer = answer.model_copy(
        update={"history": explained.history, "rationale": explained.rationale}
    )
    outcome.generation = Generation(
        text=generation.text,
        finish=generation.finish,
        prompt_tokens=prefill.prompt_tokens,
        cached_tokens=prefill.cached_tokens,
        completion_tokens=generation.completion_tokens,
        prefill_s=prefill.prefill_s + generation.prefill_s,
        decode_s=generation.decode_s,
        choice_probs=prefill.choice_probs,
    )
    outcome.loops = loops
    return outcome
