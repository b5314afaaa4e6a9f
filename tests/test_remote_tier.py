"""A remote tier that serves many requests at once: replica choice and ejection (pure), the
latency model at a concurrency, and the async path through /evaluate against scripted engines
on loopback (real HTTP): requests overlap on the engine, saturation and 429/503 answer
'overloaded' at once or route down, a replica that dies is failed over. The same against a
real engine with parallel slots is in test_remote_engine.py."""

from __future__ import annotations

import asyncio
import time
from typing import Any

import pytest
from fastapi import FastAPI

from service.app import create_app
from service.backends.fake import FakeBackend, Script
from service.backends.replicas import ReplicaSet
from service.decision.routing import LatencyModel
from service.settings import TierSettings
from tests.conftest import answer, fake_settings, running_app, sample_request
from tests.scripted_engine import Reply, content_events, scripted_engines

PIECES = ['{"', "decision", '":', ' "', "deny", '",', ' "evidence": ["R1"],', ' "rationale": "no"}']
# ~1 s a request (long enough for all 8 to be sent before the first ends, on a loaded
# machine too), over when its last piece is sent (no finish event or [DONE] after it, so
# that the engine's count of streams at once is exact)
SLOW = Reply(content_events(PIECES, finish=None)[:-1], pause_s=0.15)


# ---- the replica set, pure -----------------------------------------------------------------
class Clock:
    def __init__(self) -> None:
        self.now = 100.0

    def __call__(self) -> float:
        return self.now


def test_least_in_flight_first_and_ties_to_the_one_sent_fewer() -> None:
    replicas = ReplicaSet(["http://a/v1", "http://b/v1", "http://c/v1"])
    first = [replicas.acquire() for _ in range(3)]
    assert [r.url for r in first if r] == ["http://a/v1", "http://b/v1", "http://c/v1"]
    assert first[1] is not None
    replicas.release(first[1])
    again = replicas.acquire()
    assert again is not None and again.url == "http://b/v1"  # the only one with none in flight
    assert replicas.next_in_flight() == 1


def test_ejection_keeps_the_last_replica_and_health_brings_one_back() -> None:
    clock = Clock()
    events: list[tuple[str, str]] = []
    replicas = ReplicaSet(["http://a/v1", "http://b/v1"], eject_s=5.0, clock=clock)
    replicas.listener = lambda url, event: events.append((url, event))
    a, b = replicas.replicas
    assert replicas.eject(a, "lost") is True
    assert replicas.eject(b, "lost") is False  # the last live one stays: per-request errors
    assert [r.url for r in replicas.live] == ["http://b/v1"]
    assert replicas.acquire(frozenset({"http://b/v1"})) is None
    replicas.health(a, True)
    assert not a.live  # not before eject_s
    clock.now += 5.0
    replicas.health(a, True)
    assert a.live
    replicas.health(a, False)  # one failed check ejects nothing; two in a row do
    assert a.live
    replicas.health(a, False)
    assert [r.url for r in replicas.live] == ["http://b/v1"]
    replicas.health(b, False, definite=False)  # timed out: the last live one is spared
    replicas.health(b, False, definite=False)
    assert b.live
    replicas.health(b, False)  # refused: the last one too
    assert replicas.live == [] and replicas.acquire() is None
    assert ("http://a/v1", "ejected:lost") in events and ("http://a/v1", "readmitted") in events


def test_a_paused_replica_gets_nothing_until_its_pause_ends() -> None:
    clock = Clock()
    replicas = ReplicaSet(["http://a/v1", "http://b/v1"], busy_s=1.0, clock=clock)
    a, b = replicas.replicas
    replicas.pause(a, None)
    chosen = replicas.acquire()
    assert chosen is b and not replicas.all_busy
    replicas.pause(b, 2.0)  # Retry-After: 2
    assert replicas.all_busy and replicas.acquire() is None
    clock.now += 1.0
    assert replicas.acquire() is a


# ---- the latency model at a concurrency ----------------------------------------------------
def test_prediction_comes_from_the_nearest_measured_concurrency() -> None:
    model = LatencyModel()
    for _ in range(8):  # alone: 1000 prompt tokens/s, 100 tokens/s decode
        model.observe(
            prompt_tokens=500, cached_tokens=0, prefill_s=0.5, completion_tokens=51, decode_s=0.5
        )
        # eight at once: each request gets a quarter of the speed
        model.observe(
            prompt_tokens=500,
            cached_tokens=0,
            prefill_s=2.0,
            completion_tokens=51,
            decode_s=2.0,
            concurrency=8,
        )
    alone = model.predict(500, 50, concurrency=1)
    eight = model.predict(500, 50, concurrency=8)
    assert alone == pytest.approx(1.0) and eight == pytest.approx(4.0)
    assert model.predict(500, 50, concurrency=6) == pytest.approx(4.0)  # 5-8: measured at 8
    assert model.predict(500, 50, concurrency=2) == pytest.approx(1.0)  # nearest: alone
    assert model.predict(500, 50, concurrency=32) == pytest.approx(4.0)  # nearest: eight
    assert model.prompt_tokens_within(2.0, 50, concurrency=8) < model.prompt_tokens_within(
        2.0, 50, concurrency=1
    )


def test_a_sparsely_measured_level_is_pooled_with_its_neighbours() -> None:
    model = LatencyModel()
    # one cold measurement alone (10 s) and ten warm ones at 3-4 in flight (0.2 s each)
    model.observe(
        prompt_tokens=1000, cached_tokens=0, prefill_s=9.0, completion_tokens=11, decode_s=1.0
    )
    for _ in range(10):
        model.observe(
            prompt_tokens=1000,
            cached_tokens=900,
            prefill_s=0.1,
            completion_tokens=11,
            decode_s=0.1,
            concurrency=4,
        )
    # alone: the cold one pooled with the level nearest it, not the cold one alone (which
    # would say 10 s for ever, as no request would be sent to measure that level again)
    assert model.predict(1000, 10, concurrency=1) < 1.0
    assert model.predict(1000, 10, concurrency=4) < 1.0


# ---- the async path through /evaluate -------------------------------------------------------
def _remote(urls: list[str], **tier: Any) -> TierSettings:
    return TierSettings(
        backend="openai",
        base_urls=urls,
        remote_model="served",
        health_interval_s=tier.pop("health_interval_s", 0.05),
        **tier,
    )


def _app(remote: TierSettings, default_tier: str = "strategic") -> FastAPI:
    """The remote tier as `strategic` above a fake edge tier that denies."""
    settings = fake_settings(
        tiers={"edge": TierSettings(backend="fake"), "strategic": remote},
        default_tier=default_tier,
    )
    edge = FakeBackend(scripts=[Script(text=answer("deny", ["R1"], [1]))])
    return create_app(settings, {"edge": edge})


async def _evaluate_many(client: Any, count: int, **request: Any) -> list[dict[str, Any]]:
    body = sample_request(**request)
    responses = await asyncio.gather(*(client.post("/evaluate", json=body) for _ in range(count)))
    assert all(r.status_code == 200 for r in responses)
    return [r.json() for r in responses]


async def test_a_replica_streaming_an_answer_is_not_polled() -> None:
    # a poll can break the stream it interrupts (llama-cpp-python's server drops a stream when
    # any other request arrives); the answer streaming is itself the sign the replica is up
    with scripted_engines(SLOW) as (engine,):
        async with running_app(_app(_remote([engine.url], health_interval_s=0.02))) as client:
            [body] = await _evaluate_many(client, 1, tier="strategic")
            await asyncio.sleep(0.1)  # idle again: polled again
        assert body["decision"] == "deny" and not body["degraded"]
        assert engine.polls_while_streaming == 0


async def test_eight_requests_overlap_on_the_engine_and_the_serial_path_does_not() -> None:
    with scripted_engines(SLOW) as (engine,):
        app = _app(_remote([engine.url]))
        async with running_app(app) as client:
            started = time.monotonic()
            bodies = await _evaluate_many(client, 8, tier="strategic")
            concurrent_s = time.monotonic() - started
        assert engine.peak == 8
    with scripted_engines(SLOW) as (engine,):
        app = _app(_remote([engine.url], max_concurrency=1, max_queue=8))
        async with running_app(app) as client:
            started = time.monotonic()
            serial = await _evaluate_many(client, 8, tier="strategic")
            serial_s = time.monotonic() - started
        assert engine.peak == 1
    assert all(b["decision"] == "deny" and not b["degraded"] for b in bodies + serial)
    assert concurrent_s < serial_s / 3, (concurrent_s, serial_s)


async def test_at_its_limit_a_pinned_request_is_overloaded_and_an_open_one_routes_down() -> None:
    with scripted_engines(Reply(content_events(PIECES), pause_s=0.1)) as (engine,):
        app = _app(_remote([engine.url], max_concurrency=2), default_tier="edge")
        async with running_app(app) as client:
            first = [
                asyncio.create_task(client.post("/evaluate", json=sample_request(tier="strategic")))
                for _ in range(2)
            ]
            await asyncio.sleep(0.1)  # both in flight on the engine
            started = time.monotonic()
            pinned = await client.post("/evaluate", json=sample_request(tier="strategic"))
            pinned_s = time.monotonic() - started
            routed = (await client.post("/evaluate", json=sample_request())).json()
            done = [(await t).json() for t in first]
    assert pinned.json()["reason"] == "overloaded" and pinned.json()["decision"] == "escalate"
    assert pinned_s < 0.2  # at once, not after the two in flight
    assert routed["tier"] == "edge" and routed["route"]["kind"] == "routed_down", routed
    assert all(not d["degraded"] for d in done)


async def test_429_moves_to_another_replica_and_all_busy_answers_overloaded_at_once() -> None:
    busy = Reply(status=429, body="too many")
    with (
        scripted_engines(busy) as (saturated,),
        scripted_engines(Reply(content_events(PIECES))) as (fine,),
    ):
        app = _app(_remote([saturated.url, fine.url], busy_s=30))
        async with running_app(app) as client:
            served = await _evaluate_many(client, 4, tier="strategic")
            sent = len(saturated.bodies)  # those sent before its first 429 came back
            served += await _evaluate_many(client, 4, tier="strategic")
        assert 1 <= sent <= 2 and len(saturated.bodies) == sent  # paused: nothing more to it
    assert all(not b["degraded"] and b["decision"] == "deny" for b in served)
    with scripted_engines(Reply(status=503, body="loading")) as (alone,):
        app = _app(_remote([alone.url], busy_s=30))
        async with running_app(app) as client:
            started = time.monotonic()
            first = (await client.post("/evaluate", json=sample_request(tier="strategic"))).json()
            took = time.monotonic() - started
            then = (await client.post("/evaluate", json=sample_request(tier="strategic"))).json()
            routed = (await client.post("/evaluate", json=sample_request())).json()
        assert len(alone.bodies) == 1  # the tier is saturated while its only replica is busy
    assert first["reason"] == "overloaded" and first["decision"] == "escalate" and took < 0.5
    assert then["reason"] == "overloaded"
    assert routed["tier"] == "edge"  # routing goes down while the remote tier is saturated


async def test_a_replica_dying_mid_answer_is_resent_to_another_one() -> None:
    dying = Reply(content_events(PIECES[:3], finish=None)[:-1], drop=True)
    allow = Reply(content_events(['{"decision": "', 'allow", "evidence": [], "rationale": "ok"}']))
    with scripted_engines(dying) as (bad,), scripted_engines(allow) as (good,):
        # the bad replica is first: least in flight with ties to the first listed
        app = _app(_remote([bad.url, good.url], eject_s=60))
        async with running_app(app) as client:
            first = (await client.post("/evaluate", json=sample_request(tier="strategic"))).json()
            more = await _evaluate_many(client, 4, tier="strategic")
            metrics = (await client.get("/metrics")).text
    assert len(bad.bodies) == 1  # ejected after it went away; the resend went to `good`
    assert first["degraded"] is False and first["decision"] == "allow", first
    assert all(b["degraded"] is False for b in more)
    ejected = f'replica_events_total{{event="ejected",replica="{bad.url}",tier="strategic"}} 1.0'
    assert ejected in metrics
    assert f'gatekeeper_replica_up{{replica="{bad.url}",tier="strategic"}} 0.0' in metrics


async def test_a_stopped_replica_is_ejected_and_comes_back_when_healthy() -> None:
    with scripted_engines(Reply(content_events(PIECES)), count=2) as (a, b):
        app = _app(_remote([a.url, b.url], eject_s=0.0))
        async with running_app(app) as client:
            a.set_healthy(False)
            await asyncio.sleep(0.8)  # a few health checks: two failed in a row eject
            served = await _evaluate_many(client, 4, tier="strategic")
            assert len(a.bodies) == 0 and len(b.bodies) == 4
            a.set_healthy(True)
            await asyncio.sleep(0.8)
            await _evaluate_many(client, 4, tier="strategic")
            assert len(a.bodies) >= 1  # back in the choice
            b.stop()  # refused from now on: ejected at the first failure, resent to a
            after = await _evaluate_many(client, 3, tier="strategic")
    assert all(not r["degraded"] for r in served + after)


async def test_a_tier_whose_replicas_are_all_down_is_unavailable_and_routing_skips_it() -> None:
    with scripted_engines(Reply(content_events(PIECES))) as (engine,):
        async with running_app(_app(_remote([engine.url]), default_tier="edge")) as client:
            engine.set_healthy(False)
            await asyncio.sleep(0.8)
            pinned = await client.post("/evaluate", json=sample_request(tier="strategic"))
            routed = (await client.post("/evaluate", json=sample_request())).json()
    assert pinned.json()["reason"] == "model_unavailable", pinned.json()
    assert "without a live engine" in pinned.json()["rationale"]
    assert routed["tier"] == "edge" and not routed["degraded"]
