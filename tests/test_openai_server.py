"""OpenAICompatibleBackend against a real engine: llama-cpp-python's server, started on loopback
with SmolLM2-135M. /evaluate answers through a tier with backend 'openai', and an engine that
goes away mid-request gives a fail-closed answer within the budget, never 'allow'."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path

import pytest

from service.app import create_app
from service.backends.base import ChatMessage, GenerationRequest, Prompt
from service.backends.openai import OpenAICompatibleBackend
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.verify import parse_answer
from service.errors import BackendError
from service.ops.weights import ModelStore
from service.settings import Settings, TierSettings, load_settings
from tests.conftest import fake_settings, running_app, sample_request
from tests.realserver import llama_cpp_server

pytestmark = pytest.mark.model

SMOL = "smollm2-135m-instruct-q4_1"
SHAPE = AnswerShape(("R1",), (1,), max_cited=1, rationale_chars=80, revision_chars=40)


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return ModelStore(load_settings()).resolve(SMOL)


@pytest.fixture(scope="module")
def engine(smol_path: Path) -> Iterator[str]:
    with llama_cpp_server(smol_path, alias="smollm2") as (url, _proc):
        yield url


def _settings(url: str, **tier: object) -> Settings:
    return fake_settings(
        tiers={
            "strategic": TierSettings(
                backend="openai",
                base_url=url,
                remote_model="smollm2",
                response_format="json_object",  # llama-cpp-python's server's form
                n_ctx=2048,
                # SmolLM2 spends many short tokens on a rationale: room enough to close it
                max_tokens=192,
                rationale_chars=120,
                **tier,  # type: ignore[arg-type]
            )
        },
        default_tier="strategic",
    )


def _prompt(action: str) -> Prompt:
    return Prompt(
        (
            ChatMessage("system", "You judge agent actions. Answer in JSON."),
            ChatMessage("user", f"## Evidence\n[R1] Never delete user data.\n## Action\n{action}"),
        ),
        RESPONSE_PREFIX,
    )


def test_the_engine_enforces_the_schema_and_streams_through_the_hook(engine: str) -> None:
    backend = OpenAICompatibleBackend("smollm2", engine, response_format="json_object")
    backend.load()
    pieces: list[str] = []

    def hook(_token: int, piece: str) -> bool:
        pieces.append(piece)
        return False

    try:
        request = GenerationRequest(
            _prompt("rm -rf /home/user"), build_constraint(SHAPE), 128, time.monotonic() + 120
        )
        generation = backend.generate(request, hook)
    finally:
        backend.close()
    answer = parse_answer(RESPONSE_PREFIX + generation.text, SHAPE)
    assert answer.evidence in ([], ["R1"]) and set(answer.history) <= {1}
    assert len(pieces) > 5 and "".join(pieces) == generation.text
    assert generation.prefill_s > 0 and generation.completion_tokens >= len(pieces)


async def test_evaluate_on_an_openai_tier(engine: str) -> None:
    async with running_app(create_app(_settings(engine))) as client:
        ready = (await client.get("/readyz")).json()
        assert {t["name"]: t["state"] for t in ready["tiers"]} == {"strategic": "loaded"}
        response = await client.post("/evaluate", json=sample_request(latency_budget_ms=120_000))
    body = response.json()
    assert response.status_code == 200
    assert body["degraded"] is False, body
    assert body["decision"] in {"allow", "deny", "revise", "escalate"}
    assert (body["decision"] == "revise") == (body.get("revision") is not None)
    assert body["tier"] == "strategic" and body["model"] == "smollm2"
    assert {e["id"] for e in body["evidence"]} <= {"R1", "T1"}
    assert body["usage"]["completion_tokens"] > 5


def test_the_engine_dying_mid_answer_is_a_backend_error_within_budget(smol_path: Path) -> None:
    with llama_cpp_server(smol_path, alias="smollm2") as (url, proc):
        backend = OpenAICompatibleBackend("smollm2", url, response_format="json_object")
        backend.load()

        def kill_on_first_piece(_token: int, _piece: str) -> bool:
            if proc.poll() is None:
                proc.send_signal(signal.SIGKILL)
                proc.wait()
            return False

        started = time.monotonic()
        request = GenerationRequest(_prompt("rm -rf /"), build_constraint(SHAPE), 128, started + 60)
        try:
            with pytest.raises(BackendError, match="went away mid-answer"):
                backend.generate(request, kill_on_first_piece)
        finally:
            backend.close()
    assert time.monotonic() - started < 60


async def test_evaluate_fails_closed_when_the_engine_goes_away(smol_path: Path) -> None:
    budget_ms = 60_000
    with llama_cpp_server(smol_path, alias="smollm2") as (url, proc):
        async with running_app(create_app(_settings(url))) as client:
            # a longer prompt keeps the engine busy in prefill when it is killed
            request = sample_request(goal="Free up disk space. " * 60, latency_budget_ms=budget_ms)
            started = time.monotonic()
            pending = asyncio.create_task(client.post("/evaluate", json=request))
            await asyncio.sleep(0.3)
            proc.send_signal(signal.SIGKILL)
            response = await pending
            took = time.monotonic() - started
    body = response.json()
    assert response.status_code == 200
    assert body["degraded"] is True and body["reason"] == "model_error", body
    assert body["decision"] == "escalate"  # the configured fail-closed posture, never allow
    assert took < budget_ms / 1000 / 4  # well inside the budget: no waiting on a dead engine


def test_decision_probabilities_from_the_engines_logprobs(engine: str) -> None:
    backend = OpenAICompatibleBackend(
        "smollm2", engine, response_format="json_object", top_logprobs=10
    )
    backend.load()
    try:
        request = GenerationRequest(
            _prompt("rm -rf /"), build_constraint(SHAPE), 12, time.monotonic() + 120
        )
        generation = backend.generate(request)
    finally:
        backend.close()
    probs = generation.choice_probs
    assert set(probs) == {"allow", "deny", "revise", "escalate"}
    assert all(0 < p <= 1 for p in probs.values())
    assert generation.text.split('"')[0] in probs  # the decision the engine wrote
