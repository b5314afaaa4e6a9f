"""The loop detector on the decision path: stop, retry with anti-repetition sampling, another
tier, or fail closed with `doom_loop` (scripted fake backends)."""

from __future__ import annotations

from service.backends.fake import FakeBackend, Script
from tests.conftest import answer, fake_app, sample_request

GEMMA_LOOP = (
    'deny", "evidence": ["R1"], "history": [], "rationale": "'
    + "The policy is not clear. " * 8
    + '"}'
)


async def test_a_loop_is_stopped_early_and_the_retry_recovers() -> None:
    backend = FakeBackend(scripts=[Script(GEMMA_LOOP), Script(answer("deny", ["R1"], [1]))])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request())
        metrics = (await client.get("/metrics")).text
    body = response.json()
    assert body["decision"] == "deny" and body["degraded"] is False
    assert [(loop["tier"], loop["kind"], loop["action"]) for loop in body["loops"]] == [
        ("edge", "repeated_sentence", "retry")
    ]
    # stopped at the third copy of the sentence, long before the end of the output
    assert body["loops"][0]["at_token"] < len(GEMMA_LOOP) // 4 - 20
    first, retry = backend.requests
    assert first.repeat_penalty == 1.0 and first.temperature == 0.0
    assert retry.repeat_penalty > 1.0 and retry.presence_penalty > 0 and retry.temperature > 0
    assert (
        'gatekeeper_loops_total{action="retry",kind="repeated_sentence",tier="edge"} 1.0' in metrics
    )


async def test_a_tier_that_keeps_looping_hands_over_to_another_tier() -> None:
    # routing picks mid (the most capable that fits); mid loops twice; edge answers
    fix = answer("deny", ["R1"], [])
    edge = FakeBackend("edge-model", scripts=[Script(fix)])
    mid = FakeBackend("mid-model", scripts=[Script(GEMMA_LOOP)])
    async with fake_app({"edge": edge, "mid": mid}) as client:
        body = (await client.post("/evaluate", json=sample_request())).json()
    assert body["tier"] == "edge" and body["decision"] == "deny" and body["degraded"] is False
    loops = [(loop["tier"], loop["action"]) for loop in body["loops"]]
    assert loops == [("mid", "retry"), ("mid", "other_tier")]
    assert len(mid.requests) == 2 and len(edge.requests) == 1


async def test_loops_everywhere_fail_closed_with_doom_loop() -> None:
    edge = FakeBackend("edge-model", scripts=[Script(GEMMA_LOOP)])
    async with fake_app({"edge": edge}) as client:
        body = (await client.post("/evaluate", json=sample_request())).json()
        metrics = (await client.get("/metrics")).text
    assert body["decision"] == "escalate" and body["degraded"] is True
    assert body["reason"] == "doom_loop"
    assert [loop["action"] for loop in body["loops"]] == ["retry", "fail_closed"]
    assert 'gatekeeper_fail_closed_total{reason="doom_loop",tier="edge"} 1.0' in metrics


async def test_whitespace_runs_inside_a_string_are_loops_too() -> None:
    spaces = 'allow", "rationale": "ok' + " " * 200 + '"}'
    edge = FakeBackend(scripts=[Script(spaces), Script(answer("allow", ["R1"], []))])
    async with fake_app({"edge": edge}) as client:
        body = (await client.post("/evaluate", json=sample_request())).json()
    assert body["loops"][0]["kind"] == "whitespace_run"
    assert body["decision"] == "allow" and body["degraded"] is False


async def test_no_time_for_a_retry_goes_straight_to_the_fallback() -> None:
    # the looping attempt uses ~0.4 s of a 0.6 s budget: a second try cannot fit
    edge = FakeBackend(scripts=[Script(GEMMA_LOOP, token_delay_s=0.02)])
    async with fake_app({"edge": edge}) as client:
        body = (await client.post("/evaluate", json=sample_request(latency_budget_ms=600))).json()
    assert body["reason"] in ("doom_loop", "deadline")
    assert body["decision"] != "allow"
    assert len(edge.requests) == 1


async def test_normal_answers_report_no_loops() -> None:
    edge = FakeBackend(scripts=[Script(answer("deny", ["R1", "T1"], [1, 2, 3]))])
    async with fake_app({"edge": edge}) as client:
        body = (await client.post("/evaluate", json=sample_request())).json()
    assert body["loops"] == [] and len(edge.requests) == 1
