"""Running one read on a tier: the job on its worker (the probe path or generation, then the
revision in the same job), or on the event loop for a tier whose engine serves many at once;
counted in the tier's queue while it waits, cut at the budget's deadline, and moved to another
tier after a loop the tier could not recover from. Framework-free; used by the pipeline."""

from __future__ import annotations

import asyncio
import logging
from collections.abc import Awaitable, Callable
from typing import TypeVar

from service.decision.answers import decision_policy, normalised, settle
from service.decision.budget import Budget
from service.decision.generation import FailClosed, LoopFailure, Outcome, arun_on_tier, run_on_tier
from service.decision.probe_path import run_probe_on_tier
from service.decision.reviser import revise_on_tier, unsafe_verdict
from service.decision.revision import RevisionAttempt, RevisionOutcome
from service.decision.tiers import QueueWaitExceededError, Tier, TierPool
from service.ops.telemetry import Metrics
from service.schemas import (
    Decision,
    DegradedReason,
    EvaluateRequest,
    EvidenceItem,
    InjectionSignal,
    LoopReport,
)
from service.settings import Settings

logger = logging.getLogger(__name__)

# Time kept back from the budget for verification and the response itself.
RESPONSE_RESERVE_S = 0.02

# How a tier reads one request (its probe, else generation), given the wait before it.
Judge = Callable[[EvaluateRequest, float], Outcome]
# The revision step for an outcome of this request: an answer at once (none wanted, a
# tripwire), or the work to run on the outcome's tier worker.
RevisionWork = Callable[[], RevisionAttempt]
ReviseStep = Callable[[Outcome], RevisionAttempt | RevisionWork | None]
T = TypeVar("T")


class TierRunner:
    def __init__(self, settings: Settings, pool: TierPool, metrics: Metrics) -> None:
        self.settings = settings
        self.pool = pool
        self.metrics = metrics

    def fallback(self, tried: list[str]) -> Tier | None:
        """Another loaded tier after a loop: the next more capable one, else a weaker one."""
        names = self.settings.ordered_tiers()
        last = names.index(tried[-1]) if tried[-1] in names else len(names)
        order = names[last + 1 :] + names[:last][::-1]
        for name in order:
            tier = self.pool.tiers.get(name)
            if name not in tried and tier is not None and tier.available:
                return tier
        return None

    async def run(
        self,
        tier: Tier,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        budget: Budget,
        max_prompt_tokens: int | None,
        revise: ReviseStep | None,
    ) -> Outcome:
        """The tier's answer; after a loop that the tier could not recover from, another
        tier's. `revise` (when set) runs in the same worker job as the decision."""
        loops: list[LoopReport] = []
        tried = [tier.name]
        while True:
            try:
                judge = self.judge(tier, evidence, budget.deadline, max_prompt_tokens)
                outcome = await self._on_worker(
                    tier, request, evidence, budget, max_prompt_tokens, judge, revise
                )
            except LoopFailure as failure:
                loops += failure.loops
                other = self.fallback(tried)
                if other is None or budget.remaining() <= 0:
                    self.count_loops(loops)
                    raise FailClosed(
                        DegradedReason.DOOM_LOOP, "the model looped and could not recover", loops
                    ) from failure
                loops[-1].action = "other_tier"
                tier = other
                tried.append(tier.name)
                continue
            except FailClosed as fault:
                fault.loops = loops + fault.loops
                self.count_loops(fault.loops)
                raise
            outcome.loops = loops + outcome.loops
            self.count_loops(outcome.loops)
            return outcome

    async def _on_worker(
        self,
        tier: Tier,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        budget: Budget,
        max_prompt_tokens: int | None,
        judge: Judge,
        revise: ReviseStep | None,
    ) -> Outcome:
        """One read on the tier: a job on its worker (then the revision, in the same job, so
        that it never queues behind requests admitted since), or on the event loop for a tier
        whose engine serves many at once."""

        def job(queue_s: float) -> Outcome:
            outcome = judge(request, queue_s)
            if revise is not None:
                work = revise(outcome)
                outcome.revision, outcome.revised = work() if callable(work) else work, True
            return outcome

        async def concurrent_job(queue_s: float) -> Outcome:
            return await arun_on_tier(
                tier,
                request,
                evidence,
                budget.deadline,
                queue_s,
                settings=self.settings,
                choose=decision_policy(self.settings.allow_threshold_of(tier.name)),
                metrics=self.metrics,
                max_prompt_tokens=max_prompt_tokens,
            )

        concurrent = tier.concurrent and tier.probes is None
        return await self.admitted(
            tier,
            budget,
            lambda: (
                tier.run_concurrent(concurrent_job, budget.deadline)
                if concurrent
                else tier.run(job, budget.deadline)
            ),
        )

    async def admitted(self, tier: Tier, budget: Budget, work: Callable[[], Awaitable[T]]) -> T:
        """`work` on the tier, counted in its queue while it waits or runs, and cut at the
        deadline (a fail-closed `deadline`)."""
        # admission is counted before the first await, so that concurrent requests routed in
        # the same loop iteration see each other
        tier.pending += 1
        self.metrics.queue_depth.labels(tier.name).set(tier.pending)
        try:
            return await asyncio.wait_for(
                work(), timeout=max(0.0, budget.remaining()) + RESPONSE_RESERVE_S
            )
        except (TimeoutError, QueueWaitExceededError) as exc:
            raise FailClosed(DegradedReason.DEADLINE, "the latency budget ran out") from exc
        finally:
            tier.pending -= 1
            self.metrics.queue_depth.labels(tier.name).set(tier.pending)

    def judge(
        self,
        tier: Tier,
        evidence: list[EvidenceItem],
        deadline: float,
        max_prompt_tokens: int | None,
    ) -> Judge:
        """How the tier reads a request: its probe, else generation (on its worker)."""
        run = run_probe_on_tier if tier.probes is not None else run_on_tier
        choose = decision_policy(self.settings.allow_threshold_of(tier.name))

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

    def revise_step(
        self,
        request: EvaluateRequest,
        evidence: list[EvidenceItem],
        budget: Budget,
        signals: list[InjectionSignal],
    ) -> ReviseStep:
        """After an unsafe verdict, when the request (or its tier) asks: a safer action of the
        same shape, read by the same judge in the same context (service.decision.reviser). The step
        answers at once where no revision is wanted or possible, else gives the work to run
        on the outcome's tier worker."""

        def revise(outcome: Outcome) -> RevisionAttempt | RevisionWork | None:
            tier = outcome.tier
            wanted = request.revise if request.revise is not None else tier.settings.revise
            threshold = self.settings.allow_threshold_of(tier.name)
            decision, _ = settle(outcome, threshold)
            p_allow = normalised(outcome.generation.choice_probs).get(Decision.ALLOW.value)
            backend = tier.backend
            if not wanted or not unsafe_verdict(decision, p_allow) or backend is None:
                return None
            if backend.engine == "openai":
                return None  # a remote engine writes the answer's opening, not the revision's
            if signals:  # the request argued with the judge: no action of the model's is offered
                return RevisionAttempt(RevisionOutcome.TRIPWIRE)
            read = self.judge(tier, evidence, budget.deadline, None)
            return lambda: revise_on_tier(
                tier,
                request,
                outcome,
                decision,
                budget.deadline,
                judge=lambda candidate: settle(read(candidate, 0.0), threshold),
                settings=self.settings,
                metrics=self.metrics,
            )

        return revise

    async def queued(
        self, revise: ReviseStep, outcome: Outcome, budget: Budget
    ) -> RevisionAttempt | None:
        """The revision as a job of its own on the outcome's tier, where it could not run in
        the decision's job (the answer might have been escalated, but was not)."""
        work = revise(outcome)
        if not callable(work):
            return work
        tier = outcome.tier
        try:
            return await self.admitted(
                tier, budget, lambda: tier.run(lambda _q: work(), budget.deadline)
            )
        except FailClosed:
            return RevisionAttempt(RevisionOutcome.NO_BUDGET, detail="the budget ran out")
        except Exception as exc:  # our own bug: the original decision stands
            logger.exception("revision step failed on %s", tier.name)
            return RevisionAttempt(RevisionOutcome.FAULT, detail=type(exc).__name__)

    def count_loops(self, loops: list[LoopReport]) -> None:
        for loop in loops:
            self.metrics.loops.labels(loop.tier, loop.kind, loop.action).inc()
