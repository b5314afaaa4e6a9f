"""The probe path on one tier, in named steps: **read** the decision from the hidden states of
one prefill (`read_decision`), **fall back** to generation when the probe abstains, **cite**
the evidence that applies (`cite_evidence`), and **explain** the fixed decision by
constrained generation when the request asks and the budget allows (`explain`).

The prompt is already in the KV cache when the explanation is generated, so it starts decoding
at once. A probe that reads the action's mean decides before the roll-call: that prefill stops
at its header, and goes on through the roll-call only for a deny or escalate, which cite."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass
from typing import Any

from service.backends.base import (
    ChoicePolicy,
    Finish,
    Generation,
    HiddenStateReader,
    HiddenStates,
)
from service.decision.generation import (
    FailClosed,
    LoopFailure,
    Outcome,
    build_on_tier,
    generate_answer,
    run_on_tier,
)
from service.decision.grammar import AnswerShape
from service.decision.ood import GuardReading
from service.decision.probes import ProbeSet, cite
from service.decision.prompt import PROFILE_HEADER, ROLL_CALL_HEADER, BuiltPrompt
from service.decision.tiers import Tier
from service.decision.verify import ModelAnswer
from service.errors import BackendDeadlineError, BackendError
from service.ops.telemetry import Metrics
from service.schemas import Decision, DegradedReason, EvaluateRequest, EvidenceItem
from service.settings import Settings

logger = logging.getLogger(__name__)


def probe_decision(probes: ProbeSet, p_unsafe: float) -> Decision:
    if p_unsafe <= probes.allow_below:
        return Decision.ALLOW
    if p_unsafe >= probes.deny_above:
        return Decision.DENY
    return Decision.ESCALATE


class _Prefill:
    """Hidden states of the tier's prompt, read under the request's deadline; engine errors
    become fail-closed faults."""

    def __init__(self, backend: HiddenStateReader, built: BuiltPrompt, deadline: float) -> None:
        self.backend, self.built, self.deadline = backend, built, deadline

    def __call__(self, **kwargs: Any) -> HiddenStates:
        try:
            return self.backend.hidden_states(self.built.prompt, deadline=self.deadline, **kwargs)
        except BackendDeadlineError as exc:
            raise FailClosed(
                DegradedReason.DEADLINE, "the prefill stopped at the deadline"
            ) from exc
        except BackendError as exc:
            raise FailClosed(DegradedReason.MODEL_ERROR, exc.message) from exc


@dataclass
class ProbeRead:
    """What one prefill told the tier's probes."""

    states: HiddenStates
    rows: Any  # the decision rows, one per layer read
    at: dict[int, int]  # layer -> its row
    prefill: Generation  # the prefill as a generation with no output (for routing, timing)
    score: float
    p_unsafe: float
    decision: Decision
    guard: GuardReading
    split: bool  # read before the roll-call, which is not in the KV cache yet
    shallow: bool  # only the blocks the probes read were evaluated past the profile

    @property
    def abstains(self) -> bool:
        """An allow far from the probe's training data: generation decides instead (far from
        its data the probe's P(unsafe) means nothing: it said 0.000 to `rm -rf` of a photo
        folder). A deny or escalate out there stands: it can only make the answer stricter."""
        return self.decision == Decision.ALLOW and not self.guard.inside


def read_decision(
    probes: ProbeSet, built: BuiltPrompt, request: EvaluateRequest, prefill: _Prefill
) -> ProbeRead:
    """Step 1: the decision from one prefill. An action-mean probe decides from a prefill that
    stops before the roll-call; the roll-call (a line per evidence item, ~15 tokens each) is
    read only when there is something to cite that the item probe does not know, so an allow,
    and a deny among the pack's own rules, cost no more prefill than generation's prompt."""
    split = probes.decides_before_roll_call and bool(built.marks)
    # When nothing will be generated on this prompt (no explanation asked, the pack's rules
    # cited from the same vector), the request's own tokens need to go only as deep as the
    # probes read: the blocks above are skipped. An abstention then prefills them again.
    shallow = split and probes.items_for(built.evidence) is not None and not request.explain
    states = prefill(
        layers=probes.decision_layers if split else probes.layers,
        marks=() if split else built.marks,
        span=probes.decision_span(bool(built.marks)),
        until=ROLL_CALL_HEADER if split else None,
        shallow_after=PROFILE_HEADER if shallow else None,
    )
    at = {layer: k for k, layer in enumerate(states.layers)}
    rows = probes.decision_rows(states)
    row = rows[at[probes.decision.layer]]
    score, p_unsafe = float(probes.decision.score(row)), float(probes.decision.prob(row))
    return ProbeRead(
        states=states,
        rows=rows,
        at=at,
        prefill=Generation(
            text="",
            finish=Finish.STOP,
            prompt_tokens=states.prompt_tokens,
            cached_tokens=states.cached_tokens,
            prefill_s=states.prefill_s,
        ),
        score=score,
        p_unsafe=p_unsafe,
        decision=probe_decision(probes, p_unsafe),
        guard=probes.guard.read(rows[at[probes.guard.layer]], score),
        split=split,
        shallow=shallow,
    )


def cite_evidence(
    probes: ProbeSet, built: BuiltPrompt, read: ProbeRead, prefill: _Prefill, max_cited: int
) -> tuple[list[str], bool]:
    """Step 3: the evidence that applies to a deny or escalate, and whether the roll-call is
    now in the KV cache. An item probe reads it from the decision's own vector; a relevance
    probe from the roll-call's marks, prefilled from where the first read stopped if need be."""
    ids = [item.id for item in built.evidence]
    rolled = not read.split
    if read.decision == Decision.ALLOW or not ids:
        return [], rolled
    items, relevance = probes.items_for(built.evidence), probes.relevance
    if items is not None:
        p = items.probs(read.rows[read.at[items.layer]], built.evidence)
        return cite(p, ids, items.threshold, max_cited), rolled
    if relevance is None:
        return [], rolled
    if read.split:  # the roll-call, from where the first prefill stopped
        marked = prefill(layers=(relevance.layer,), marks=built.marks)
        roll_call = marked.marks[0]
        read.prefill.prompt_tokens = marked.prompt_tokens
        read.prefill.prefill_s += marked.prefill_s
        rolled = True
    else:
        roll_call = read.states.marks[read.at[relevance.layer]]
    return cite(relevance.prob(roll_call), ids, probes.relevance_threshold, max_cited), rolled


def explain(
    tier: Tier,
    outcome: Outcome,
    built: BuiltPrompt,
    deadline: float,
    *,
    settings: Settings,
    metrics: Metrics,
) -> Outcome:
    """Step 4: the rationale by constrained generation with the decision fixed (the probe
    cites; generation explains). A loop or a fault there leaves the decision standing."""
    limits, decision = tier.settings, outcome.answer.decision
    shape = AnswerShape(
        evidence_ids=(),
        history_ids=built.history_ids,
        max_cited=limits.max_cited,
        rationale_chars=limits.rationale_chars,
        revision_chars=limits.revision_chars,
    )
    try:
        explained, generation, loops = generate_answer(
            tier,
            built,
            shape,
            lambda _p: decision.value,
            deadline,
            settings=settings,
            metrics=metrics,
        )
    except LoopFailure as failure:
        outcome.loops = failure.loops
        return outcome
    except FailClosed as fault:
        outcome.loops = fault.loops
        logger.info("no rationale after the probe on %s: %s", tier.name, fault.detail)
        return outcome
    prefill = outcome.generation
    outcome.answer = outcome.answer.model_copy(
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


def _probe_answer(probes: ProbeSet, read: ProbeRead, cited: list[str]) -> ModelAnswer:
    return ModelAnswer(
        decision=read.decision,
        evidence=cited,
        rationale=(
            f"Probe on layer {probes.decision.layer}: P(unsafe) = {read.p_unsafe:.2f}"
            + (f"; applicable: {', '.join(cited)}" if cited else "")
            + ("" if read.guard.inside else "; the request is unlike the probe's training data")
            + "."
        ),
    )


def _note_abstention(tier: Tier, read: ProbeRead, metrics: Metrics) -> None:
    metrics.probe_abstentions.labels(tier.name).inc()
    logger.info(
        "probe on %s abstains (distance %.1f, residual %.1f, score %.1f): generation decides",
        tier.name,
        read.guard.distance,
        read.guard.residual,
        read.score,
    )


def _probe_outcome(
    tier: Tier,
    probes: ProbeSet,
    built: BuiltPrompt,
    read: ProbeRead,
    cited: list[str],
    queue_s: float,
) -> Outcome:
    """The probe's decision as the tier's outcome, its P(unsafe) as the choice probabilities."""
    read.prefill.choice_probs = {
        Decision.ALLOW.value: 1.0 - read.p_unsafe,
        Decision.DENY.value: read.p_unsafe,
    }
    return Outcome(
        tier,
        _probe_answer(probes, read, cited),
        built,
        read.prefill,
        queue_s,
        decided_by="probe",
        allow_at=1 - probes.allow_below,
    )


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
    """The decision and the cited evidence from the tier's probes after one prefill; when the
    probe abstains, generation decides under `choose` and the same deadline; then, when the
    request asks for an explanation and the budget allows, the rationale."""
    backend, probes = tier.backend, tier.probes
    assert isinstance(backend, HiddenStateReader) and probes is not None
    built = build_on_tier(tier, request, evidence, settings, max_prompt_tokens, roll_call=True)
    prefill = _Prefill(backend, built, deadline)
    read = read_decision(probes, built, request, prefill)
    tier.note_probe(abstained=read.abstains)
    cited, rolled = cite_evidence(probes, built, read, prefill, tier.settings.max_cited)
    if not read.shallow:  # a shallow prefill is faster than the generation path's: routing
        tier.observe(read.prefill)  # would learn too low a cost for the requests that generate
    metrics.tokens.labels(tier.name, "prompt").inc(read.prefill.prompt_tokens)
    if read.abstains:  # step 2: generation decides
        _note_abstention(tier, read, metrics)
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
    outcome = _probe_outcome(tier, probes, built, read, cited, queue_s)
    q = settings.latency_quantile
    rationale_s = tier.predict(0, explain=True, quantile=q, rationale_only=True, queued=False)
    if not request.explain or time.monotonic() + rationale_s >= deadline:
        return outcome
    # an allow read before the roll-call is explained without it: it is not in the KV
    # cache, and the rationale does not need it
    return explain(
        tier,
        outcome,
        built if rolled else built.without_roll_call(),
        deadline,
        settings=settings,
        metrics=metrics,
    )
