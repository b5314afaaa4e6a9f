"""The real service as a separate process, on real models, over real HTTP."""

from __future__ import annotations

import json
import subprocess
import sys
from pathlib import Path

import httpx
import pytest

from service.client import AsyncGatekeeperClient, GatekeeperAPIError, GatekeeperClient
from tests.conftest import sample_request
from tests.realserver import ROOT, gatekeeper_server

pytestmark = pytest.mark.model

README_EXAMPLE = ROOT / "examples" / "rm-home.json"


def _check_decision(body: dict[str, object], supplied: set[str]) -> None:
    assert body["decision"] in {"allow", "deny", "revise", "escalate"}
    assert body["degraded"] is False, body
    assert 0.0 <= body["confidence"] <= 1.0  # type: ignore[operator]
    assert {e["id"] for e in body["evidence"]} <= supplied  # type: ignore[union-attr]
    assert (body["decision"] == "revise") == (body.get("revision") is not None)
    assert body["usage"]["prompt_tokens"] > 100  # type: ignore[index]


def test_smollm2_server_end_to_end_with_client_and_cli(tmp_path: Path) -> None:
    env = {
        "GATEKEEPER_TIERS__EDGE__MODEL": "smollm2-135m-instruct-q4_1",
        "GATEKEEPER_LOAD_TIERS": '["edge"]',
    }
    with gatekeeper_server(env) as (url, _proc):
        ready = httpx.get(f"{url}/readyz").json()
        assert {t["name"]: t["state"] for t in ready["tiers"]}["edge"] == "loaded"
        with GatekeeperClient(url) as client:
            answer = client.evaluate(sample_request(request_id="smol-1"))
            assert answer.request_id == "smol-1"
            _check_decision(answer.model_dump(mode="json"), {"R1", "T1"})
            with pytest.raises(GatekeeperAPIError) as bad:
                client.evaluate(sample_request(tier="nope"))
            assert bad.value.status == 400 and bad.value.error is not None
            assert bad.value.error.error.code == "unknown_tier"
        # the CLI posts a request file and prints the answer
        request_file = tmp_path / "req.json"
        request_file.write_text(json.dumps(sample_request()))
        cli = subprocess.run(
            [sys.executable, "-m", "service", "evaluate", str(request_file), "--url", url],
            capture_output=True,
            text=True,
            timeout=120,
            check=False,
        )
        assert cli.returncode == 0, cli.stderr
        _check_decision(json.loads(cli.stdout), {"R1", "T1"})
        metrics = httpx.get(f"{url}/metrics").text
        assert (
            'gatekeeper_model_loaded{model="smollm2-135m-instruct-q4_1",tier="edge"} 1.0' in metrics
        )
        assert "gatekeeper_requests_total" in metrics


async def test_qwen_edge_server_answers_the_readme_example() -> None:
    body = json.loads(README_EXAMPLE.read_text())
    with gatekeeper_server({"GATEKEEPER_LOAD_TIERS": '["edge"]'}) as (url, proc):
        async with AsyncGatekeeperClient(url) as client:
            answer = await client.evaluate(body)
        _check_decision(
            answer.model_dump(mode="json"),
            {e["id"] for e in body.get("evidence", [])} or {f"GK-{i:02d}" for i in range(1, 15)},
        )
        assert answer.tier == "edge" and answer.model == "qwen2.5-coder-0.5b-instruct-q4_k_m"
        assert answer.decision != "allow"  # deleting a home folder is not allowed
    # SIGTERM drains and stops the server with status 0 (service/cli/serve.py)
    assert proc.returncode == 0
