"""Latency model, tier choice, admission and escalation (pure logic, then scripted fakes)."""

from __future__ import annotations

import asyncio
import math
import time

from service.app import create_app
from service.backends.fake import FakeBackend, Script
from service.decision.routing import LatencyModel, RouteKind, TierView, choose_route
from tests.conftest import answer, fake_settings, running_app, sample_request


def _model(prefill_tps: float, decode_tps: float, n: int = 5) -> LatencyModel:
    model = LatencyModel(window=16, max_age_s=60)
    for _ in range(n):
        model.observe(
            prompt_tokens=1000,
            cached_tokens=0,
            prefill_s=1000 / prefill_tps,
            completion_tokens=101,
            decode_s=100 / decode_tps,
        )
    return model


def test_prediction_is_queue_plus_prefill_plus_decode() -> None:
    model = _model(prefill_tps=100, decode_tps=20)
    assert math.isclose(model.predict(500, 41, queue_s=1.0), 1.0 + 5.0 + 2.05, rel_tol=1e-6)
    assert model.prompt_tokens_within(7.05, 41) == 500


def test_prediction_uses_a_slow_quantile_and_the_cache_miss_ratio() -> None:
    model = _model(100, 20)
    model.observe(
        prompt_tokens=1000, cached_tokens=0, prefill_s=20, completion_tokens=101, decode_s=10
    )
    assert model.predict(100, 0, quantile=0.5) == 1.0
    assert model.predict(100, 0, quantile=0.99) == 2.0  # the slow one
    cached = LatencyModel()
    cached.observe(
        prompt_tokens=1000, cached_tokens=900, prefill_s=1.0, completion_tokens=11, decode_s=0.5
    )
    assert cached.predict(1000, 0) == 1.0  # 100 uncached tokens at 100 tok/s


def test_old_measurements_age_out_but_a_few_are_kept() -> None:
    model = LatencyModel(window=8, max_age_s=10)
    model.observe(
        prompt_tokens=100, cached_tokens=0, prefill_s=10, completion_tokens=11, decode_s=1, now=0
    )
    model.observe(
        prompt_tokens=100, cached_tokens=0, prefill_s=1, completion_tokens=11, decode_s=1, now=100
    )
    assert model.predict(100, 0, now=105) == 1.0  # the 10 tok/s one is too old
    assert model.predict(100, 0, now=1000) > 0  # idle for long: still an estimate
    assert LatencyModel().predict(1000, 100) == 0.0  # never measured: assumed to fit


def view(name: str, predict: float, *, saturated: bool = False, max_prompt: int = 0) -> TierView:
    return TierView(name, True, saturated, predict, max_prompt)


def test_most_capable_tier_that_fits() -> None:
    tiers = [view("edge", 0.5), view("mid", 2.0), view("strategic", 9.0)]
    assert choose_route(tiers, 3.0, pinned=None, min_prompt_tokens=10).tier == "mid"
    assert choose_route(tiers, 10.0, pinned=None, min_prompt_tokens=10).tier == "strategic"
    assert choose_route(tiers, 1.0, pinned=None, min_prompt_tokens=10).kind == RouteKind.FITS


def test_saturated_tier_routes_down_or_overloads() -> None:
    tiers = [view("edge", 0.5), view("mid", 2.0, saturated=True)]
    route = choose_route(tiers, 3.0, pinned=None, min_prompt_tokens=10)
    assert (route.kind, route.tier) == (RouteKind.ROUTED_DOWN, "edge")
    both = [view("edge", 0.5, saturated=True), view("mid", 2.0, saturated=True)]
    assert choose_route(both, 3.0, pinned=None, min_prompt_tokens=10).kind == RouteKind.OVERLOADED


def test_nothing_fits_shrinks_the_prompt_or_is_infeasible() -> None:
    tiers = [view("edge", 5.0, max_prompt=400), view("mid", 20.0, max_prompt=50)]
    route = choose_route(tiers, 2.0, pinned=None, min_prompt_tokens=100)
    assert (route.kind, route.tier, route.max_prompt_tokens) == (RouteKind.SHRUNK, "edge", 400)
    route = choose_route(tiers, 2.0, pinned=None, min_prompt_tokens=500)
    assert route.kind == RouteKind.INFEASIBLE


def test_a_pin_overrides_routing_but_not_the_deadline() -> None:
    tiers = [view("edge", 0.5, max_prompt=10), view("mid", 20.0, max_prompt=300)]
    assert choose_route(tiers, 30.0, pinned="edge", min_prompt_tokens=5).kind == RouteKind.PINNED
    route = choose_route(tiers, 3.0, pinned="mid", min_prompt_tokens=100)
    assert (route.kind, route.tier) == (RouteKind.SHRUNK, "mid")
    assert (
        choose_route(tiers, 3.0, pinned="mid", min_prompt_tokens=500).kind == RouteKind.INFEASIBLE
    )


def _seed(app: object, name: str, prefill_tps: float, decode_tps: float) -> None:
    tier = app.state.gatekeeper.pool.tiers[name]  # type: ignore[attr-defined]
    tier.latency = _model(prefill_tps, decode_tps)


async def test_tight_budget_goes_to_the_fast_tier_and_generous_to_the_capable() -> None:
    edge = FakeBackend("edge-model", scripts=[Script(answer("deny", ["R1"], []))])
    mid = FakeBackend("mid-model", scripts=[Script(answer("allow", ["R1"], []))])
    app = create_app(fake_settings(), {"edge": edge, "mid": mid})
    async with running_app(app) as client:
        _seed(app, "edge", prefill_tps=20_000, decode_tps=2000)  # ~0.1 s for this request
        _seed(app, "mid", prefill_tps=400, decode_tps=40)  # ~4 s
        tight = (await client.post("/evaluate", json=sample_request(latency_budget_ms=1500))).json()
        generous = (
            await client.post("/evaluate", json=sample_request(latency_budget_ms=20_000))
        ).json()
        metrics = (await client.get("/metrics")).text
    assert (tight["tier"], tight["route"]["kind"]) == ("edge", "fits")
    assert tight["route"]["predicted_ms"] < 1500
    assert (generous["tier"], generous["route"]["kind"]) == ("mid", "fits")
    assert 'gatekeeper_routes_total{kind="fits",tier="edge"} 1.0' in metrics
    assert "gatekeeper_predicted_seconds_count" in metrics


async def test_an_infeasible_budget_fails_closed_at_once() -> None:
    edge = FakeBackend("edge-model", scripts=[Script(answer("allow", [], []))])
    app = create_app(fake_settings(), {"edge": edge})
    async with running_app(app) as client:
        _seed(app, "edge", prefill_tps=200, decode_tps=20)
        started = time.monotonic()
        body = (await client.post("/evaluate", json=sample_request(latency_budget_ms=50))).json()
        elapsed = time.monotonic() - started
    assert body["reason"] == "budget_infeasible" and body["decision"] == "escalate"
    assert elapsed < 0.05 and edge.requests == []


async def test_shrinking_drops_history_to_fit_the_fastest_tier() -> None:
    edge = FakeBackend("edge-model", scripts=[Script(answer("deny", [], []))])
    app = create_app(fake_settings(), {"edge": edge})
    history = [{"role": "user", "content": f"turn {i} " + "word " * 100} for i in range(30)]
    async with running_app(app) as client:
        _seed(app, "edge", prefill_tps=2000, decode_tps=200)  # ~2 s for the whole history
        body = (
            await client.post(
                "/evaluate", json=sample_request(history=history, latency_budget_ms=1500)
            )
        ).json()
    assert body["route"]["kind"] == "shrunk" and body["degraded"] is False
    assert body["trimmed"]["history_turns"] > 0


async def test_a_busy_tier_routes_down_then_escalates_an_unsure_answer() -> None:
    unsure = {"allow": 0.5, "deny": 0.45}
    edge = FakeBackend(
        "edge-model",
        scripts=[Script(answer("allow", [], []), prefill_delay_s=0.3, choice_probs=unsure)],
    )
    mid = FakeBackend(
        "mid-model",
        scripts=[
            Script(
                answer("deny", ["R1"], []),
                prefill_delay_s=0.2,
                choice_probs={"deny": 0.9, "allow": 0.1},
            )
        ],
    )
    settings = fake_settings(escalate_below=0.8)
    settings.tiers["mid"].max_queue = 1
    app = create_app(settings, {"edge": edge, "mid": mid})
    async with running_app(app) as client:
        first = asyncio.create_task(client.post("/evaluate", json=sample_request(request_id="a")))
        await asyncio.sleep(0.05)  # mid is busy with the first request
        second = (await client.post("/evaluate", json=sample_request(request_id="b"))).json()
        await first
        metrics = (await client.get("/metrics")).text
    assert second["route"]["kind"] == "routed_down"
    assert second["route"]["escalated_from"] == "edge"
    assert second["tier"] == "mid" and second["decision"] == "deny"
    assert 'gatekeeper_escalations_total{from_tier="edge",to_tier="mid"} 1.0' in metrics


async def test_a_flood_beyond_the_queues_is_refused_fast_and_never_allowed() -> None:
    slow = Script(
        answer("allow", [], []), prefill_delay_s=0.3, choice_probs={"allow": 0.9, "deny": 0.1}
    )
    edge = FakeBackend("edge-model", scripts=[slow])
    settings = fake_settings()
    settings.tiers["edge"].max_queue = 2
    app = create_app(settings, {"edge": edge})
    async with running_app(app) as client:
        bodies = await asyncio.gather(
            *(client.post("/evaluate", json=sample_request(tier="edge")) for _ in range(6))
        )
    answers = [b.json() for b in bodies]
    overloaded = [a for a in answers if a["reason"] == "overloaded"]
    assert len(overloaded) >= 3
    assert all(a["decision"] != "allow" for a in answers if a["degraded"])
    assert all(a["timing"]["total_ms"] < 50 for a in overloaded)
