"""The probe's out-of-distribution guard: far from its training data the probe's allow does not
stand and generation decides in the same request; its deny does; every fallback still fails
closed; files without a guard are refused; routing budgets for the fallback."""

from __future__ import annotations

import json
from pathlib import Path

import numpy as np
import pytest

from benchmarks.probes.guard import fit_guard_cv
from service.backends.fake import Script
from service.decision.ood import OodGuard
from service.decision.probes import ProbeSet
from service.decision.tiers import Tier
from service.errors import ConfigurationError
from service.settings import TierSettings
from tests.conftest import answer, fake_app, sample_request
from tests.test_probes import D, HiddenFake, fake_guard, probe_file, probe_tiers

SAFE_ACTION = {"tool": "shell", "arguments": {"cmd": "du -sh ~"}}


async def test_an_allow_out_of_distribution_goes_to_generation(tmp_path: Path) -> None:
    generated = Script(answer("deny", evidence=["R1"], history=[], rationale="Unfamiliar."))
    edge = HiddenFake(scripts=[generated])
    edge.ood_shift = 5.0  # residual 5 > 1: unlike the probe's training data
    request = sample_request(tier="edge", explain=True, action=SAFE_ACTION)
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
        metrics = (await client.get("/metrics")).text
    # the probe said allow (P(unsafe) 0.05); generation's deny is the answer, and says so
    assert body["decision"] == "deny" and body["decided_by"] == "generation"
    assert [e["id"] for e in body["evidence"]] == ["R1"] and not body["degraded"]
    assert body["rationale"] == "Unfamiliar."
    assert 'gatekeeper_probe_abstentions_total{tier="edge"} 1.0' in metrics
    assert 'gatekeeper_decided_by_total{path="generation",tier="edge"} 1.0' in metrics
    (generation,) = edge.requests
    assert "evidence" in generation.constraint.schema["properties"]  # generation cites, too
    # the tier's own allow threshold decides, not a decision fixed in advance
    assert generation.choose is not None and generation.choose({"allow": 0.999}) == "allow"
    assert edge.prefills == [(2, 3)]  # one prefill for the probe, then generation


async def test_an_allow_beyond_the_probe_score_range_goes_to_generation(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(answer("escalate"))])
    edge.loudness = 6.0  # distance 6 / 3 = 2 and residual 0 pass; the score -6 is beyond -4
    request = sample_request(tier="edge", explain=False, action=SAFE_ACTION)
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
        metrics = (await client.get("/metrics")).text
    assert body["decision"] == "escalate" and body["decided_by"] == "generation"
    assert 'gatekeeper_probe_abstentions_total{tier="edge"} 1.0' in metrics
    assert len(edge.requests) == 1


async def test_an_allow_in_distribution_stands_without_generating(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(error="generation must not run")])
    edge.ood_shift = 0.5  # residual 0.5 <= 1
    request = sample_request(tier="edge", explain=False, action=SAFE_ACTION)
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
        metrics = (await client.get("/metrics")).text
    assert body["decision"] == "allow" and body["decided_by"] == "probe"
    assert "unlike" not in body["rationale"]
    assert "gatekeeper_probe_abstentions_total{" not in metrics
    assert edge.requests == []


async def test_a_deny_out_of_distribution_stands(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(error="generation must not run")])
    edge.ood_shift = 5.0
    request = sample_request(tier="edge", explain=False)  # rm -rf: the probe says unsafe
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
        metrics = (await client.get("/metrics")).text
    assert body["decision"] == "deny" and body["decided_by"] == "probe"
    assert "unlike the probe's training data" in body["rationale"]
    assert "gatekeeper_probe_abstentions_total{" not in metrics
    assert edge.requests == []


async def test_a_failed_fallback_fails_closed(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(error="engine fell over")])
    edge.ood_shift = 5.0
    request = sample_request(tier="edge", explain=False, action=SAFE_ACTION)
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
    # never the probe's allow: the answer is the fail-closed one
    assert body["decision"] == "escalate" and body["degraded"]
    assert body["reason"] == "model_error" and body["decided_by"] == "none"


async def test_a_fallback_that_runs_out_of_time_fails_closed(tmp_path: Path) -> None:
    slow = Script(answer("allow", evidence=[], history=[]), token_delay_s=0.2)
    edge = HiddenFake(scripts=[slow])
    edge.ood_shift = 5.0
    request = sample_request(tier="edge", explain=False, action=SAFE_ACTION, latency_budget_ms=600)
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
    assert body["decision"] == "escalate" and body["degraded"]
    assert body["reason"] == "deadline" and body["timing"]["total_ms"] < 1500


def test_a_probe_file_without_a_guard_is_refused(tmp_path: Path) -> None:
    raw = json.loads(probe_file(tmp_path).read_text())
    raw["format"] = 1
    del raw["guard"]
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    with pytest.raises(ConfigurationError, match="no out-of-distribution guard"):
        ProbeSet.load(old)


async def test_a_tier_refuses_a_guardless_probe_and_generates(tmp_path: Path) -> None:
    raw = json.loads(probe_file(tmp_path).read_text())
    raw["format"] = 1
    old = tmp_path / "old.json"
    old.write_text(json.dumps(raw))
    edge = HiddenFake(scripts=[Script(answer("deny", evidence=["R1"], history=[]))])
    async with fake_app({"edge": edge}, tiers=probe_tiers(old)) as client:
        ready = (await client.get("/readyz")).json()
        body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
    detail = next(t for t in ready["tiers"] if t["name"] == "edge")["detail"]
    assert "probe refused" in detail and "out-of-distribution guard" in detail
    assert body["decided_by"] == "generation" and edge.prefills == []


def test_the_guard_reads_distance_and_residual() -> None:
    guard = fake_guard()
    x = np.zeros(D)
    x[0], x[1], x[4] = 3.0, 4.0, 0.5
    reading = guard.read(x, score=3.0)
    assert reading.distance == pytest.approx(5.0 / 3.0)  # sqrt(9 + 16) / 3
    assert reading.residual == pytest.approx(0.5)
    assert reading.inside
    assert not guard.read(x, score=-4.5).inside  # beyond the probe's training range
    x[1] = 6.0  # sqrt(9 + 36) / 3 = 2.24 > 2
    assert not guard.read(x, score=3.0).inside
    again = OodGuard.from_json(json.loads(json.dumps(guard.to_json())))
    assert again.distances(x)[0] == pytest.approx(guard.distances(x)[0], rel=1e-3)  # 4 digits


def test_a_guard_whose_arrays_disagree_is_refused() -> None:
    raw = fake_guard().to_json()
    raw["precision"] = np.eye(3).tolist()
    with pytest.raises(ValueError, match="do not fit"):
        OodGuard.from_json(raw)


def test_routing_budgets_for_generation_unless_the_probe_seldom_abstains(tmp_path: Path) -> None:
    tier = Tier("edge", TierSettings(backend="fake"))
    tier.probes = ProbeSet.load(probe_file(tmp_path))
    assert not tier.probe_decides_alone(0.9)  # no answer yet: budget for generation
    for _ in range(19):
        tier.note_probe(abstained=False)
    tier.note_probe(abstained=True)
    assert tier.probe_decides_alone(0.9)  # 5 % abstained: the 90th percentile is a prefill
    tier.note_probe(abstained=True)
    tier.note_probe(abstained=True)
    assert not tier.probe_decides_alone(0.9)  # 3 of 22: generation is inside the quantile
    tier.probes = None
    assert not tier.probe_decides_alone(0.0)


def test_the_fitted_guard_keeps_its_own_kind_and_rejects_a_stranger() -> None:
    rng = np.random.default_rng(0)
    mixing = rng.normal(size=(20, 20))
    x = rng.normal(size=(120, 20)) @ mixing  # correlated, full rank
    scores = x[:, 0]  # a stand-in for the decision probe's raw scores
    guard, figures = fit_guard_cv(x, 3, 5, 0.95, np.arange(120) % 6, scores)
    assert guard.components.shape == (5, 20) and guard.layer == 3
    assert (guard.min_score, guard.max_score) == (scores.min(), scores.max())
    assert figures["oof_coverage"] >= 0.9  # two thresholds at q95 of out-of-fold readings
    assert np.mean([guard.read(v, s).inside for v, s in zip(x, scores, strict=True)]) >= 0.9
    assert guard.read(x.mean(axis=0), 0.0).inside
    louder = 10 * rng.normal(size=(50, 20)) @ mixing  # the same axes, ten times as far
    assert not any(guard.read(v, 0.0).inside for v in louder)
