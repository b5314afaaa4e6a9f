"""The latency budget of one request: made once, where the request is admitted, and passed
down to routing, the tier's worker and the answer. Everything that asks "how long is left?"
asks this value."""

from __future__ import annotations

import time
from dataclasses import dataclass

from service.schemas import EvaluateRequest


@dataclass(frozen=True)
class Budget:
    start: float  # time.monotonic() when the request was admitted
    total_ms: int

    @classmethod
    def starting_now(cls, total_ms: int) -> Budget:
        return cls(time.monotonic(), total_ms)

    @property
    def deadline(self) -> float:
        """The absolute time.monotonic() by which the answer must be out."""
        return self.start + self.total_ms / 1000.0

    def remaining(self) -> float:
        """Seconds left (negative once the deadline has passed)."""
        return self.deadline - time.monotonic()

    def elapsed_ms(self) -> float:
        return (time.monotonic() - self.start) * 1000.0


@dataclass(frozen=True)
class Admission:
    """A request that passed the client-error checks: its id is set and its clock runs."""

    request: EvaluateRequest
    budget: Budget

    @property
    def request_id(self) -> str:
        assert self.request.request_id is not None
        return self.request.request_id
