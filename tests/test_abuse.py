"""Resource abuse through create_app with the fake backend: each hostile body gets a clear 4xx in
the error shape, or a trimmed or fail-closed answer; never a 500, and the service stays up."""

from __future__ import annotations

import json
from pathlib import Path
from typing import Any

import pytest

from service.backends.fake import FakeBackend, Script
from service.schemas import MAX_ARGUMENT_DEPTH, MAX_EVIDENCE
from tests.conftest import answer, fake_app, sample_request
from tests.test_api import assert_error

JSON = {"content-type": "application/json"}


def _with_arguments(raw_arguments: str) -> bytes:
    body = sample_request(action={"tool": "shell", "arguments": {"cmd": "PLACEHOLDER"}})
    return json.dumps(body).replace('"PLACEHOLDER"', raw_arguments).encode()


def _nested(depth: int) -> str:
    return '{"a": ' * depth + "1" + "}" * depth


@pytest.mark.parametrize(
    ("content", "status", "code"),
    [
        # deeper than the argument limit: refused by the schema, before any serialiser sees it
        # (at 300 levels the audit log's model_dump raised: a 500 before this limit)
        (_with_arguments(_nested(300)), 422, "validation_error"),
        (_with_arguments("[" * 300 + "]" * 300), 422, "validation_error"),
        # deeper than the JSON parser itself goes
        (_with_arguments("[" * 50_000 + "]" * 50_000), 400, "invalid_body"),
        # invalid UTF-8, and a lone surrogate escape
        (
            json.dumps(sample_request()).encode().replace(b"Free up", b"Free \xff\xfe up"),
            400,
            "invalid_body",
        ),
        (
            json.dumps(sample_request()).replace("Free up", "\\ud800").encode(),
            422,
            "validation_error",
        ),
        # an integer longer than Python converts
        (_with_arguments("1" + "0" * 5000), 400, "invalid_body"),
        (b"\x00\x01" * 100, 422, "validation_error"),
        (b"[]", 422, "validation_error"),
    ],
    ids=[
        "nested-objects",
        "nested-arrays",
        "nested-past-parser",
        "invalid-utf8",
        "lone-surrogate",
        "huge-integer",
        "binary",
        "array",
    ],
)
async def test_hostile_bodies_get_a_clear_4xx_and_the_service_stays_up(
    tmp_path: Path, content: bytes, status: int, code: str
) -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", [], []))])
    audit = {"enabled": True, "path": str(tmp_path / "decisions.db")}
    async with fake_app({"edge": backend}, audit=audit) as client:
        response = await client.post("/evaluate", content=content, headers=JSON)
        health = await client.get("/healthz")
        after = await client.post("/evaluate", json=sample_request())
    assert_error(response, status, code)
    assert len(backend.requests) == 1  # only the follow-up reached the model
    assert health.status_code == 200 and after.status_code == 200


async def test_arguments_at_the_depth_limit_are_judged_and_logged(tmp_path: Path) -> None:
    # {"cmd": <n objects>} is n + 1 deep
    backend = FakeBackend(scripts=[Script(answer("deny", [], []))])
    audit = {"enabled": True, "path": str(tmp_path / "decisions.db")}
    async with fake_app({"edge": backend}, audit=audit) as client:
        response = await client.post(
            "/evaluate", content=_with_arguments(_nested(MAX_ARGUMENT_DEPTH - 1)), headers=JSON
        )
    assert response.status_code == 200, response.text
    assert response.json()["decision"] == "deny"


async def test_a_huge_body_is_refused_before_parsing() -> None:
    backend = FakeBackend(scripts=[Script(answer())])
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(goal="x" * 3_000_000))
        after = await client.get("/healthz")
    assert_error(response, 413, "payload_too_large")
    assert after.status_code == 200 and backend.requests == []


async def test_thousands_of_evidence_items_get_a_422() -> None:
    backend = FakeBackend(scripts=[Script(answer())])
    items = [{"id": f"E{i}", "text": "A rule."} for i in range(5000)]
    async with fake_app({"edge": backend}) as client:
        response = await client.post("/evaluate", json=sample_request(evidence=items))
    error = assert_error(response, 422, "validation_error")
    assert error["param"] == "evidence" and str(MAX_EVIDENCE) in str(error["message"])
    assert backend.requests == []


async def test_the_most_evidence_and_history_allowed_is_trimmed_to_the_context() -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", [], []))], context_size=2048)
    evidence = [{"id": f"E{i}", "text": "rule " * 200} for i in range(MAX_EVIDENCE)]
    history: list[dict[str, Any]] = [{"role": "tool", "content": "out " * 500}] * 200
    body = sample_request(evidence=evidence, history=history)
    async with fake_app({"edge": backend}, max_body_bytes=2_000_000) as client:
        response = await client.post("/evaluate", json=body)
    answer_ = response.json()
    assert response.status_code == 200 and answer_["degraded"] is False
    assert answer_["trimmed"]["history_turns"] == 200
    assert answer_["trimmed"]["evidence_items"] > 0
    prompt = backend.requests[0].prompt.messages[-1].content
    assert len(prompt) < 4 * 2048  # the fake counts 4 characters a token


async def test_an_action_over_the_context_fails_closed_never_allow() -> None:
    backend = FakeBackend(scripts=[Script(answer("allow", [], []))], context_size=1024)
    async with fake_app({"edge": backend}) as client:
        response = await client.post(
            "/evaluate", json=sample_request(action={"text": "please " * 2800})
        )
    body = response.json()
    assert response.status_code == 200
    assert body["decision"] == "escalate" and body["degraded"] is True
    assert body["reason"] == "input_too_long" and backend.requests == []
