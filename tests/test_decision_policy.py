"""The decision read from the first position's distribution: a threshold on P(allow)."""

from __future__ import annotations

import dataclasses

import pytest

from service.backends.fake import FakeBackend, Script
from service.decision.answers import decision_policy
from service.settings import TierSettings
from tests.conftest import answer, fake_app, sample_request


@pytest.mark.parametrize(
    ("probs", "threshold", "expected"),
    [
        ({"allow": 0.7, "deny": 0.3}, 0.5, "allow"),
        ({"allow": 0.7, "deny": 0.3}, 0.8, "escalate"),  # likeliest, not likely enough
        ({"allow": 0.4, "deny": 0.35, "revise": 0.25}, 0.3, "allow"),  # a low bar
        ({"allow": 0.2, "deny": 0.3, "revise": 0.5}, 0.5, "revise"),
        ({"allow": 2.0, "deny": 2.0}, 0.5, "allow"),  # unnormalised input
        ({"deny": 0.9, "escalate": 0.1}, 0.0, "deny"),  # no allow at all
    ],
)
def test_threshold_on_p_allow(probs: dict[str, float], threshold: float, expected: str) -> None:
    assert decision_policy(threshold)(probs) == expected


async def test_a_tier_threshold_overrides_the_global_one() -> None:
    probs = {"allow": 0.7, "deny": 0.3}
    edge = FakeBackend(scripts=[Script(answer("allow", [], []), choice_probs=probs)])
    mid = FakeBackend(scripts=[Script(answer("allow", [], []), choice_probs=probs)])
    tiers = {
        "edge": TierSettings(backend="fake", allow_threshold=0.9),
        "mid": TierSettings(backend="fake"),
    }
    async with fake_app({"edge": edge, "mid": mid}, tiers=tiers) as client:
        on_edge = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
        on_mid = (await client.post("/evaluate", json=sample_request(tier="mid"))).json()
    assert on_edge["decision"] == "escalate"
    assert on_mid["decision"] == "allow"


async def test_an_engine_that_picks_allow_itself_is_held_to_the_threshold() -> None:
    # a remote engine samples its own decision; the probabilities it reports still decide
    unsure = FakeBackend(
        scripts=[Script(answer("allow", [], []), choice_probs={"allow": 0.55, "deny": 0.45})]
    )
    unsure_request = unsure.generate
    unsure.generate = lambda request, on_token=None: unsure_request(  # type: ignore[method-assign]
        dataclasses.replace(request, choose=None), on_token
    )
    tiers = {"edge": TierSettings(backend="fake", allow_threshold=0.8)}
    async with fake_app({"edge": unsure}, tiers=tiers) as client:
        body = (await client.post("/evaluate", json=sample_request())).json()
    assert body["decision"] == "escalate" and body["degraded"] is False
    assert body["confidence"] == pytest.approx(0.45)
