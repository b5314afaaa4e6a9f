"""Fault injection through the backend protocol: every fault answers within its budget, degraded,
never allow; the process stays up; the fault is counted in /metrics and logged with the request
id. (test_api.py checks each fault's answer; this checks the whole set of obligations.)"""

from __future__ import annotations

import logging
import time

import pytest

from service.backends.fake import FakeBackend, Script
from tests.conftest import answer, fake_app, sample_request
from tests.test_api import _BuggyBackend

_LOOP = 'allow", "evidence": [], "history": [], "rationale": "' + "safe and sound, " * 300


FAULTS = {
    "engine-raises": (lambda: FakeBackend(scripts=[Script(error="CUDA error")]), "model_error"),
    "hangs-past-deadline": (
        lambda: FakeBackend(scripts=[Script(answer("allow", [], []), prefill_delay_s=2.0)]),
        "deadline",
    ),
    "slow-tokens": (
        lambda: FakeBackend(scripts=[Script(answer("allow", [], []), token_delay_s=0.05)]),
        "deadline",
    ),
    "truncated-json": (
        lambda: FakeBackend(scripts=[Script('allow", "evidence": [')]),
        "invalid_output",
    ),
    "loops": (lambda: FakeBackend(scripts=[Script(_LOOP)]), "doom_loop"),
    "load-fails": (
        lambda: FakeBackend(load_error="sha256 mismatch for model.gguf"),
        "model_unavailable",
    ),
    "bug-in-adapter": (lambda: _BuggyBackend(scripts=[Script(answer())]), "internal_error"),
}
BUDGET_MS = 400


@pytest.mark.parametrize("fault", list(FAULTS))
async def test_a_fault_answers_in_budget_degraded_counted_and_logged(
    fault: str, caplog: pytest.LogCaptureFixture
) -> None:
    make, reason = FAULTS[fault]
    caplog.set_level(logging.INFO)
    request_id = f"fault-{fault}"
    async with fake_app({"edge": make()}) as client:
        started = time.monotonic()
        response = await client.post(
            "/evaluate",
            json=sample_request(request_id=request_id, latency_budget_ms=BUDGET_MS),
        )
        elapsed = time.monotonic() - started
        metrics = (await client.get("/metrics")).text
        health = await client.get("/healthz")
        body = response.json()
    assert response.status_code == 200, response.text
    assert body["decision"] == "escalate" and body["decision"] != "allow"
    assert body["degraded"] is True and body["reason"] == reason
    assert body["request_id"] == request_id
    assert elapsed < BUDGET_MS / 1000 + 0.3
    assert f'gatekeeper_fail_closed_total{{reason="{reason}",tier="edge"}} 1.0' in metrics
    logged = [r for r in caplog.records if getattr(r, "request_id", None) == request_id]
    assert any(r.levelno >= logging.WARNING for r in logged), [r.getMessage() for r in logged]
    assert any(getattr(r, "reason", None) == reason for r in logged)
    assert health.status_code == 200


async def test_a_bug_in_routing_fails_closed_not_500(monkeypatch: pytest.MonkeyPatch) -> None:
    # the fuzzer's StopIteration from routing was a 500: a bug before a tier is chosen must
    # fail closed like one after
    from service.decision.pipeline import Gatekeeper

    def broken(*args: object, **kwargs: object) -> None:
        raise StopIteration

    monkeypatch.setattr(Gatekeeper, "_route", broken)
    async with fake_app({"edge": FakeBackend(scripts=[Script(answer("allow", [], []))])}) as client:
        response = await client.post("/evaluate", json=sample_request(request_id="route-bug"))
        metrics = (await client.get("/metrics")).text
    body = response.json()
    assert response.status_code == 200, response.text
    assert body["decision"] == "escalate" and body["reason"] == "internal_error"
    assert body["request_id"] == "route-bug"
    assert 'gatekeeper_fail_closed_total{reason="internal_error",tier="edge"} 1.0' in metrics
