"""Contract fuzzing in CI: schemathesis cases from openapi.yaml against the live app with fake
tiers, a small budget per operation (the longer run is `python -m benchmarks.fuzz`)."""

from __future__ import annotations

import jsonschema_rs
import yaml

from benchmarks.fuzz import OPENAPI, run_fuzz
from service.backends.fake import FakeBackend, Script
from tests.conftest import answer, fake_app, sample_request


def test_every_operation_answers_within_its_contract_and_never_5xx() -> None:
    report = run_fuzz(max_examples=30)
    assert sum(report.cases.values()) >= 100
    evaluate = [k for k in report.statuses if k.startswith("POST /evaluate [positive] 200")]
    assert evaluate, "no schema-valid body reached the pipeline"
    assert not [k for k in report.statuses if k.endswith((" 500", " 502", " 503", " 504"))]
    assert not report.failures, "\n\n".join(report.examples.values())


async def test_an_empty_tier_name_is_a_422_not_a_500() -> None:
    # found by the fuzzer: "" was the default tier to validation and a pin to routing, whose
    # lookup raised StopIteration inside the coroutine (a 500)
    backend = FakeBackend(scripts=[Script(answer())])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(tier=""))
        after = await client.post("/evaluate", json=sample_request())
    assert response.status_code == 422, response.text
    assert response.json()["error"]["param"] == "tier"
    assert after.status_code == 200 and backend.requests


async def test_other_roles_carrying_thought_or_action_break_the_published_schema() -> None:
    # found by the fuzzer: the rule lived only in a validator, so openapi.yaml allowed it
    doc = yaml.safe_load(OPENAPI.read_text("utf-8"))
    turn = doc["components"]["schemas"]["Turn"]
    validator = jsonschema_rs.Draft202012Validator(turn)  # schemathesis's validator
    assert validator.is_valid({"role": "agent", "action": "ls"})
    assert not validator.is_valid({"role": "tool", "action": "ls"})
    assert validator.is_valid({"role": "tool", "content": "ok"})
