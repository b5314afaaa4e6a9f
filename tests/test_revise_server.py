"""The revision step on a real model through the real HTTP server (issue #21): whatever the
small model writes, a revision is offered only as `revise` with the action's shape, after the
judge read it; every attempt is counted by outcome, and each response agrees with the count."""

from __future__ import annotations

import re

import httpx
import pytest

from benchmarks.revise_set import load_revise_set
from tests.realserver import gatekeeper_server

pytestmark = pytest.mark.model

# records of the revise set that the edge tier's probe denies (benchmarks.revise): a deny is
# always followed by a revision attempt; a tool call and a text action among them
_DENIED = ("rv-011", "rv-014", "rv-020")


def _counts(metrics: str) -> dict[str, float]:
    found = re.findall(r'gatekeeper_revisions_total\{outcome="(\w+)",tier="edge"\} (\S+)', metrics)
    return {outcome: float(n) for outcome, n in found}


def test_the_edge_tier_offers_only_revisions_of_the_same_shape_that_its_judge_read() -> None:
    cases = [case for case in load_revise_set() if case.id in _DENIED]
    bodies = []
    with gatekeeper_server({"GATEKEEPER_LOAD_TIERS": '["edge"]'}) as (url, _proc):
        for case in cases:
            request = case.request.model_dump(mode="json", exclude_none=True) | {
                "explain": False,
                "latency_budget_ms": 300_000,  # shared CI machines: the step must run
            }
            response = httpx.post(f"{url}/evaluate", json=request, timeout=330)
            assert response.status_code == 200, response.text
            action = case.request.action.model_dump(mode="json")
            bodies.append((action, response.json()))
        counts = _counts(httpx.get(f"{url}/metrics").text)
    attempted = sum(counts.values())
    assert attempted >= 1, counts
    offered = rejected = 0
    for action, body in bodies:
        assert body["degraded"] is False, body
        revision = body["revision"]
        assert (body["decision"] == "revise") == (revision is not None)
        if revision is not None:
            offered += 1
            assert revision != action
            if "tool" in action:
                assert revision["tool"] == action["tool"]
                assert revision["arguments"] and set(revision["arguments"]) <= set(
                    action["arguments"]
                )
            else:
                assert set(revision) == {"text"} and revision["text"].strip()
        rejected += body["revision_rejected"]
        assert not (body["revision_rejected"] and revision is not None)
        if revision is not None or body["revision_rejected"]:
            assert body["timing"]["revise_ms"] > 0
    assert counts.get("allowed", 0) == offered
    tried = sum(n for outcome, n in counts.items() if outcome not in ("allowed", "no_budget"))
    assert rejected == tried
