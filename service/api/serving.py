"""One decision as the HTTP API serves it: the pipeline's answer, cut to a fail-closed answer
when a drain runs out of time, committed to the decision log before it is returned, and
logged (with its request id, without request content unless redaction is off)."""

from __future__ import annotations

import logging

from service.decision.pipeline import Gatekeeper
from service.ops.audit import DecisionLog, DecisionRecord
from service.ops.drain import Drain
from service.ops.logs import request_context
from service.schemas import DegradedReason, EvaluateRequest, EvaluateResponse

logger = logging.getLogger(__name__)


class DecisionService:
    def __init__(
        self, gatekeeper: Gatekeeper, log: DecisionLog | None, drain: Drain, *, redact: bool
    ) -> None:
        self.gatekeeper = gatekeeper
        self.log = log
        self.drain = drain
        self.redact = redact

    async def evaluate(self, request: EvaluateRequest, api_key_id: str | None) -> EvaluateResponse:
        admission = self.gatekeeper.admit(request)  # client errors first, before any work
        request = admission.request
        with request_context(admission.request_id):
            response = await self.drain.run(
                self.gatekeeper.decide(admission),
                lambda: self.gatekeeper.refuse(
                    admission,
                    DegradedReason.SHUTTING_DOWN,
                    f"the server is shutting down and its {self.drain.grace_s:g} s grace ran out",
                ),
            )
            if self.log is not None:
                # committed before the response exists for the client: DecisionLogError (503)
                # otherwise, never an unlogged decision
                await self.log.append(
                    DecisionRecord.of(request, response, api_key_id, redact=self.redact)
                )
            self._log(request, response, api_key_id)
        return response

    def _log(
        self, request: EvaluateRequest, response: EvaluateResponse, api_key_id: str | None
    ) -> None:
        extra: dict[str, object] = {
            "request_id": response.request_id,
            "decision": response.decision.value,
            "tier": response.tier,
            "degraded": response.degraded,
            "reason": response.reason.value if response.reason else None,
            "total_ms": round(response.timing.total_ms, 1),
            "api_key_id": api_key_id,
            "agent_id": request.agent.id,
        }
        if not self.redact:
            extra["action"] = request.action.model_dump(mode="json")
        logger.info("decision", extra=extra)
