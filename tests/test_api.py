"""API tests through create_app with a scripted fake backend."""

from __future__ import annotations

import asyncio
import json
import time

import pytest

from service.backends.fake import FakeBackend, Script
from tests.conftest import answer, fake_app, sample_request

ERROR_KEYS = {"message", "type", "code", "param"}


def assert_error(response: object, status: int, code: str) -> dict[str, object]:
    assert response.status_code == status, response.text  # type: ignore[attr-defined]
    body = response.json()  # type: ignore[attr-defined]
    assert set(body) == {"error"}
    assert set(body["error"]) == ERROR_KEYS
    assert body["error"]["code"] == code
    return body["error"]  # type: ignore[no-any-return]


async def test_evaluate_returns_cited_evidence_in_full() -> None:
    backend = FakeBackend(
        scripts=[Script(answer("deny", ["R1"], [1, 3]), choice_probs={"deny": 0.6, "allow": 0.2})]
    )
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request())
    assert response.status_code == 200
    body = response.json()
    assert body["decision"] == "deny"
    assert body["evidence"] == [
        {
            "id": "R1",
            "text": "Never delete user files without explicit confirmation.",
            "source": None,
        }
    ]
    assert body["cited_history"] == [1, 3]
    assert body["confidence"] == pytest.approx(0.75)
    assert body["degraded"] is False and body["reason"] is None
    assert body["revision"] is None
    assert body["tier"] == "edge" and body["model"] == "fake-model"
    assert len(body["request_id"]) == 32
    assert set(body["timing"]) == {"queue_ms", "prefill_ms", "decode_ms", "total_ms", "revise_ms"}
    assert body["timing"]["revise_ms"] == 0.0 and body["revision_rejected"] is False
    assert body["usage"]["completion_tokens"] > 0


async def test_prompt_holds_supplied_evidence_and_grammar_names_only_its_ids() -> None:
    backend = FakeBackend(scripts=[Script(answer("allow", [], []))])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(request_id="req-1"))
    assert response.json()["request_id"] == "req-1"
    request = backend.requests[0]
    user = request.prompt.messages[-1].content
    assert (
        "[R1] Never delete user files" in user
        and "[T1] (agent; must_not; exfiltrate secrets)" in user
    )
    assert "GK-01" not in user  # supplied evidence replaces the default pack
    items = request.constraint.schema["properties"]["evidence"]["items"]
    assert items["enum"] == ["R1", "T1"]
    assert '"\\"R1\\""' in request.constraint.gbnf


async def test_default_policy_pack_is_used_without_evidence() -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", ["GK-04"], []))])
    async with fake_app({"edge": backend}) as client:
        body = sample_request()
        del body["evidence"]
        response = await client.post("/evaluate", json=body)
    assert response.json()["evidence"][0]["id"] == "GK-04"
    assert response.json()["evidence"][0]["source"] == "policy:default"


async def test_revise_carries_a_checked_revision_and_other_decisions_do_not() -> None:
    # the model's own free-text revision is never offered: the revision step writes one of
    # the action's shape and the judge reads it (tests/test_revise_api.py)
    backend = FakeBackend(
        scripts=[
            Script(answer("revise", ["R1"], [], revision="rm -rf /home/me/.cache/*")),
            Script('"cmd": "rm -rf /home/me/.cache/*"}}'),
            Script(answer("allow", [], []), choice_probs={"allow": 0.9}),
        ]
    )
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(revise=True))
    body = response.json()
    assert body["decision"] == "revise"
    assert body["revision"] == {"tool": "shell", "arguments": {"cmd": "rm -rf /home/me/.cache/*"}}


@pytest.mark.parametrize(
    ("script", "reason"),
    [
        (Script(error="engine exploded"), "model_error"),
        (
            Script(text='allow", "evidence": ["NOT-SUPPLIED"], "history": [], "rationale": "x"}'),
            "invalid_output",
        ),
        (Script(text='allow", "evidence": ['), "invalid_output"),
    ],
)
async def test_faults_fail_closed_never_allow(script: Script, reason: str) -> None:
    backend = FakeBackend(scripts=[script])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request())
        metrics = (await client.get("/metrics")).text
    body = response.json()
    assert response.status_code == 200
    assert body["decision"] == "escalate"
    assert body["degraded"] is True and body["reason"] == reason
    assert body["confidence"] == 0.0
    assert f'gatekeeper_fail_closed_total{{reason="{reason}",tier="edge"}} 1.0' in metrics


async def test_invalid_output_is_retried_once() -> None:
    backend = FakeBackend(scripts=[Script(text="allow"), Script(answer("deny", ["R1"], []))])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request())
        metrics = (await client.get("/metrics")).text
    assert response.json()["decision"] == "deny"
    assert response.json()["degraded"] is False
    assert len(backend.requests) == 2
    assert 'gatekeeper_invalid_outputs_total{tier="edge"} 1.0' in metrics


async def test_deny_posture_is_configurable() -> None:
    backend = FakeBackend(scripts=[Script(error="boom")])
    async with fake_app({"edge": backend}, fail_closed_decision="deny") as client:
        response = await client.post("/evaluate", json=sample_request())
    assert response.json()["decision"] == "deny"
    assert response.json()["degraded"] is True


async def test_slow_tokens_stop_at_the_deadline_and_fail_closed() -> None:
    backend = FakeBackend(scripts=[Script(answer("allow", [], []), token_delay_s=0.05)])
    async with fake_app({"edge": backend}) as client:
        started = time.monotonic()
        response = await client.post("/evaluate", json=sample_request(latency_budget_ms=300))
        elapsed = time.monotonic() - started
    body = response.json()
    assert body["decision"] == "escalate" and body["reason"] == "deadline"
    assert elapsed < 0.3 + 0.25  # answered at the budget, not after the whole output


async def test_a_hung_engine_is_answered_at_the_deadline() -> None:
    backend = FakeBackend(scripts=[Script(answer("allow", [], []), prefill_delay_s=1.0)])
    async with fake_app({"edge": backend}) as client:
        started = time.monotonic()
        response = await client.post("/evaluate", json=sample_request(latency_budget_ms=200))
        elapsed = time.monotonic() - started
    assert response.json()["reason"] == "deadline"
    assert response.json()["decision"] != "allow"
    assert elapsed < 0.6


async def test_unloaded_model_fails_closed_and_readyz_reports_it() -> None:
    backend = FakeBackend(load_error="weights missing")
    async with fake_app({"edge": backend}) as client:
        ready = await client.get("/readyz")
        response = await client.post("/evaluate", json=sample_request())
    assert ready.status_code == 503
    edge = next(t for t in ready.json()["tiers"] if t["name"] == "edge")
    assert edge["state"] == "failed" and "weights missing" in edge["detail"]
    assert response.json()["reason"] == "model_unavailable"
    assert response.json()["decision"] == "escalate"


async def test_readyz_is_503_while_loading_and_healthz_answers() -> None:
    from service.app import create_app
    from tests.conftest import fake_settings, running_app

    backend = FakeBackend(load_delay_s=0.5, scripts=[Script(answer())])
    app = create_app(fake_settings(), {"edge": backend})
    async with running_app(app, wait_ready=False) as client:
        assert (await client.get("/healthz")).json() == {"status": "ok"}
        loading = await client.get("/readyz")
        assert loading.status_code == 503
        assert loading.json()["ready"] is False
        for _ in range(100):
            if (await client.get("/readyz")).status_code == 200:
                break
            await asyncio.sleep(0.01)
        assert (await client.get("/readyz")).status_code == 200


@pytest.mark.parametrize(
    ("mutate", "param"),
    [
        (lambda b: b.pop("action"), "action"),
        (lambda b: b.update(action={"text": "   "}), "action.tool"),
        (lambda b: b.update(action={}), None),
        (lambda b: b.update(action={"tool": "", "arguments": {}}), None),
        (lambda b: b["evidence"].append({"id": "R1", "text": "dup"}), "evidence"),
        (lambda b: b["history"].append({"role": "robot", "content": "x"}), None),
        (lambda b: b["history"].append({"role": "user", "action": "x"}), None),
        (lambda b: b.update(latency_budget_ms=0), "latency_budget_ms"),
        (lambda b: b.update(surprise=True), "surprise"),
        (lambda b: b.pop("agent"), "agent"),
    ],
)
async def test_schema_violations_get_422_in_the_error_shape(
    mutate: object, param: str | None
) -> None:
    backend = FakeBackend(scripts=[Script(answer())])
    body = sample_request()
    mutate(body)  # type: ignore[operator]
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=body)
    error = assert_error(response, 422, "validation_error")
    if param is not None:
        assert error["param"] == param
    assert backend.requests == []  # nothing reached the model


async def test_invalid_json_gets_422() -> None:
    async with fake_app({"edge": FakeBackend(scripts=[Script(answer())])}) as client:
        response = await client.post(
            "/evaluate", content=b'{"agent": ', headers={"content-type": "application/json"}
        )
    assert_error(response, 422, "validation_error")


async def test_unknown_tier_and_policy_get_400() -> None:
    async with fake_app({"edge": FakeBackend(scripts=[Script(answer())])}) as client:
        tier = await client.post("/evaluate", json=sample_request(tier="galactic"))
        policy = await client.post("/evaluate", json=sample_request(policy="nope"))
    assert assert_error(tier, 400, "unknown_tier")["param"] == "tier"
    assert assert_error(policy, 400, "unknown_policy")["param"] == "policy"


async def test_oversized_body_gets_413_declared_or_streamed() -> None:
    async with fake_app(
        {"edge": FakeBackend(scripts=[Script(answer())])}, max_body_bytes=4096
    ) as client:
        big = sample_request(goal="x" * 10_000)
        declared = await client.post("/evaluate", json=big)

        async def chunks():  # no Content-Length: the limit counts streamed bytes
            data = json.dumps(big).encode()
            for i in range(0, len(data), 1000):
                yield data[i : i + 1000]

        streamed = await client.post(
            "/evaluate", content=chunks(), headers={"content-type": "application/json"}
        )
        after = await client.post("/evaluate", json=sample_request())
    assert_error(declared, 413, "payload_too_large")
    assert_error(streamed, 413, "payload_too_large")
    assert after.status_code == 200  # the service is still up


async def test_unknown_route_uses_the_error_shape() -> None:
    async with fake_app({"edge": FakeBackend(scripts=[Script(answer())])}) as client:
        response = await client.get("/nope")
        wrong_method = await client.get("/evaluate")
    assert_error(response, 404, "not_found")
    assert_error(wrong_method, 405, "method_not_allowed")


async def test_metrics_count_requests_tokens_and_model_state() -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", ["R1"], []))])
    async with fake_app({"edge": backend}) as client:
        await client.post("/evaluate", json=sample_request())
        text = (await client.get("/metrics")).text
    assert 'gatekeeper_requests_total{decision="deny",degraded="false",tier="edge"} 1.0' in text
    assert 'gatekeeper_model_loaded{model="fake-model",tier="edge"} 1.0' in text
    assert 'gatekeeper_stage_seconds_count{stage="total",tier="edge"} 1.0' in text
    assert 'gatekeeper_tokens_total{kind="completion",tier="edge"}' in text


async def test_pinned_tier_is_used() -> None:
    edge = FakeBackend("edge-model", scripts=[Script(answer("allow", [], []))])
    mid = FakeBackend("mid-model", scripts=[Script(answer("deny", [], []))])
    async with fake_app({"edge": edge, "mid": mid}) as client:
        response = await client.post("/evaluate", json=sample_request(tier="mid"))
    assert response.json()["tier"] == "mid" and response.json()["model"] == "mid-model"
    assert edge.requests == []


async def test_explain_false_asks_for_the_decision_only() -> None:
    backend = FakeBackend(scripts=[Script('deny"}')])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(explain=False))
    assert response.json()["decision"] == "deny"
    assert "rationale" not in backend.requests[0].constraint.schema["properties"]


async def test_history_far_over_the_context_is_trimmed_and_reported() -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", [], []))], context_size=1024)
    turns = [{"role": "user", "content": f"turn {i} " + "words " * 150} for i in range(40)]
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(history=turns))
    body = response.json()
    assert body["degraded"] is False
    assert body["trimmed"]["history_turns"] > 30
    user = backend.requests[0].prompt.messages[-1].content
    assert "[40] user: turn 39" in user and "[1] user: turn 0 " not in user


class _BuggyBackend(FakeBackend):
    def generate(self, request, on_token=None):  # type: ignore[no-untyped-def]
        raise KeyError("a bug, not an engine error")


async def test_an_unexpected_bug_on_the_decision_path_still_fails_closed() -> None:
    async with fake_app({"edge": _BuggyBackend(scripts=[Script(answer())])}) as client:
        response = await client.post("/evaluate", json=sample_request())
        after = await client.get("/healthz")
    body = response.json()
    assert response.status_code == 200
    assert body["decision"] == "escalate" and body["reason"] == "internal_error"
    assert after.status_code == 200
