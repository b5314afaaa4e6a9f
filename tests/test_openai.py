"""OpenAICompatibleBackend against a scripted engine on loopback: the stream, the opening, the
deadline, retries and error mapping. The same backend against a real engine is in
test_openai_server.py."""

from __future__ import annotations

import json
import math
import time
from collections.abc import Iterator

import pytest

from service.backends.base import ChatMessage, Finish, GenerationRequest, Prompt
from service.backends.openai import OpenAICompatibleBackend
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.verify import parse_answer
from service.errors import BackendError, BackendOverloadedError, ReplicaLostError
from tests.realserver import free_port
from tests.scripted_engine import Reply, content_events, scripted_engine

SHAPE = AnswerShape(("R1",), (), max_cited=1, rationale_chars=80, revision_chars=40)
PIECES = ['{"', "decision", '":', ' "', "deny", '",', ' "evidence": ["R1"],', ' "rationale": "no"}']


def _request(budget_s: float = 5.0, max_tokens: int = 64) -> GenerationRequest:
    prompt = Prompt((ChatMessage("user", "rm -rf /"),), RESPONSE_PREFIX)
    return GenerationRequest(
        prompt, build_constraint(SHAPE), max_tokens, time.monotonic() + budget_s
    )


@pytest.fixture
def backend_for() -> Iterator[list[OpenAICompatibleBackend]]:
    made: list[OpenAICompatibleBackend] = []
    yield made
    for backend in made:
        backend.close()


def _loaded(url: str, made: list[OpenAICompatibleBackend], **kw: object) -> OpenAICompatibleBackend:
    backend = OpenAICompatibleBackend("served", url, **kw)  # type: ignore[arg-type]
    backend.load()
    made.append(backend)
    return backend


def test_streams_pieces_after_the_opening_and_sends_the_schema(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    with scripted_engine(Reply(content_events(PIECES))) as (url, bodies):
        backend = _loaded(url, backend_for, api_key="k")
        seen: list[str] = []

        def hook(_id: int, piece: str) -> bool:
            seen.append(piece)
            return False

        generation = backend.generate(_request(), hook)
    assert generation.finish == Finish.STOP
    assert generation.text == 'deny", "evidence": ["R1"], "rationale": "no"}'
    assert parse_answer(RESPONSE_PREFIX + generation.text, SHAPE).evidence == ["R1"]
    assert "".join(seen) == generation.text  # the hook saw exactly the text after the opening
    sent = bodies[0]
    assert sent["stream"] is True and sent["model"] == "served"
    assert sent["response_format"]["json_schema"]["schema"] == build_constraint(SHAPE).schema
    assert "logprobs" not in sent


def test_compact_spacing_and_another_key_order_still_verify(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    compact = ['{"decision":"al', 'low","evidence":[],"rationale":"ok"}']
    reordered = ['{"rationale": "no",', ' "evidence": ["R1"], "decision": "deny"}']
    with scripted_engine(Reply(content_events(compact)), Reply(content_events(reordered))) as (
        url,
        _,
    ):
        backend = _loaded(url, backend_for)
        first = backend.generate(_request())
        second = backend.generate(_request())
    assert parse_answer(RESPONSE_PREFIX + first.text, SHAPE).decision == "allow"
    answer = parse_answer(RESPONSE_PREFIX + second.text, SHAPE)
    assert answer.decision == "deny" and answer.rationale == "no"


def test_the_hook_stops_the_stream(backend_for: list[OpenAICompatibleBackend]) -> None:
    with scripted_engine(Reply(content_events(PIECES), pause_s=0.2)) as (url, _):
        backend = _loaded(url, backend_for)
        started = time.monotonic()
        generation = backend.generate(_request(), lambda _id, piece: piece == "deny")
    assert generation.finish == Finish.HOOK and generation.text == "deny"
    assert time.monotonic() - started < 1.5  # did not read the remaining pieces


def test_a_stalled_engine_is_cut_at_the_deadline(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    stalled = Reply(content_events(PIECES[:5], finish=None)[:-1], hang_s=10)
    with scripted_engine(stalled) as (url, _):
        backend = _loaded(url, backend_for)
        started = time.monotonic()
        generation = backend.generate(_request(budget_s=0.8))
    took = time.monotonic() - started
    assert generation.finish == Finish.DEADLINE and generation.text == "deny"
    assert 0.75 <= took < 1.2


def test_max_tokens_ends_the_stream(backend_for: list[OpenAICompatibleBackend]) -> None:
    with scripted_engine(Reply(content_events(PIECES))) as (url, _):
        generation = _loaded(url, backend_for).generate(_request(max_tokens=6))
    assert generation.finish == Finish.LENGTH and generation.completion_tokens == 6


@pytest.mark.parametrize("straddling", [True, False])
def test_decision_probabilities_from_top_logprobs(
    backend_for: list[OpenAICompatibleBackend], straddling: bool
) -> None:
    def event(token: str, tops: dict[str, float]) -> str:
        logprobs = {
            "content": [
                {
                    "token": token,
                    "logprob": tops.get(token, -9.0),
                    "top_logprobs": [{"token": t, "logprob": lp} for t, lp in tops.items()],
                }
            ]
        }
        return json.dumps({"choices": [{"delta": {"content": token}, "logprobs": logprobs}]})

    if straddling:  # the decision starts inside the token ' "de': ' "' closes the opening
        events = [
            event('{"decision":', {'{"decision":': 0.0}),
            event(' "de', {' "de': math.log(0.6), ' "all': math.log(0.3), " x": math.log(0.1)}),
            event('ny", "rationale": "r"}', {}),
            "[DONE]",
        ]
    else:  # the opening ends with a piece; the next token starts the decision
        events = [
            event('{"decision": "', {'{"decision": "': 0.0}),
            event("de", {"de": math.log(0.6), "allow": math.log(0.3), "x": math.log(0.1)}),
            event('ny", "rationale": "r"}', {}),
            "[DONE]",
        ]
    with scripted_engine(Reply(events)) as (url, bodies):
        generation = _loaded(url, backend_for, top_logprobs=5).generate(_request())
    assert bodies[0]["logprobs"] is True and bodies[0]["top_logprobs"] == 5
    # revise and escalate were not listed: at most as likely as the last listed token
    expected = {"deny": 0.6, "allow": 0.3, "revise": 0.1, "escalate": 0.1}
    assert generation.choice_probs == pytest.approx(expected)
    assert parse_answer(RESPONSE_PREFIX + generation.text, SHAPE).decision == "deny"


@pytest.mark.parametrize(
    ("reply", "message"),
    [
        (Reply(["{not json"]), "invalid event"),
        (Reply(status=400, body="bad schema"), "answered 400: bad schema"),
        (Reply(['{"error": {"message": "boom"}}']), "reported an error"),
        (Reply(content_events(PIECES[:3], finish=None)[:-1], drop=True), "went away mid-answer"),
    ],
)
def test_engine_faults_become_backend_errors(
    backend_for: list[OpenAICompatibleBackend], reply: Reply, message: str
) -> None:
    with scripted_engine(reply) as (url, _):
        backend = _loaded(url, backend_for)
        with pytest.raises(BackendError, match=message):
            backend.generate(_request())


def test_an_answer_the_engine_cut_short_is_a_lost_replica_not_an_invalid_output(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    # llama-cpp-python's server, when another request reaches it mid-stream: [DONE] with no
    # finish reason. The pipeline resends a ReplicaLostError with a fresh loop detector.
    cut = Reply(content_events(PIECES[:6], finish=None))
    with scripted_engine(cut) as (url, _):
        backend = _loaded(url, backend_for)
        with pytest.raises(ReplicaLostError, match="no finish reason"):
            backend.generate(_request())
        assert backend.health()  # it answered: it stays in


def test_a_proxy_error_is_retried_then_answered(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    away = Reply(status=502, body="bad gateway")
    with scripted_engine(away, away, Reply(content_events(PIECES))) as (url, bodies):
        generation = _loaded(url, backend_for, max_retries=2).generate(_request())
    assert len(bodies) == 3 and generation.text.startswith("deny")


def test_a_busy_engine_is_overloaded_at_once_not_retried(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    # 503 (loading, or a full queue) and 429 are the engine's own "not now": the tier is
    # saturated for busy_s, and the request fails closed as overloaded without waiting
    for status in (503, 429):
        with scripted_engine(Reply(status=status, body="busy")) as (url, bodies):
            backend = _loaded(url, backend_for, max_retries=10, busy_s=30)
            started = time.monotonic()
            with pytest.raises(BackendOverloadedError, match=f"saturated.*{status}"):
                backend.generate(_request())
            assert time.monotonic() - started < 0.5 and len(bodies) == 1
            assert backend.busy
            with pytest.raises(BackendOverloadedError):
                backend.generate(_request())  # nothing sent while the pause lasts
            assert len(bodies) == 1


def test_retries_stop_when_the_budget_is_spent(
    backend_for: list[OpenAICompatibleBackend],
) -> None:
    with scripted_engine(Reply(status=502, body="bad gateway")) as (url, bodies):
        backend = _loaded(url, backend_for, max_retries=10)
        started = time.monotonic()
        with pytest.raises(BackendError, match="engine unavailable"):
            backend.generate(_request(budget_s=0.3))
    assert time.monotonic() - started < 0.3 + 0.4  # the budget, plus scheduling slack
    assert 1 <= len(bodies) < 10


def test_an_unreachable_engine_fails_to_load_and_fails_fast() -> None:
    url = f"http://127.0.0.1:{free_port()}/v1"  # nothing listens there
    with pytest.raises(BackendError, match="cannot reach the engine"):
        OpenAICompatibleBackend("m", url).load()
    with scripted_engine(Reply(content_events(PIECES))) as (live, _):
        backend = OpenAICompatibleBackend("m", live, max_retries=1)
        backend.load()
    try:  # the engine is gone after loading: connection refused, resent once, then an error
        started = time.monotonic()
        with pytest.raises(BackendError, match="engine unavailable"):
            backend.generate(_request(budget_s=5))
        assert time.monotonic() - started < 1.0
    finally:
        backend.close()
