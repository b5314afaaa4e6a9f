"""A remote tier against a real engine with parallel slots: llama.cpp's own server
(`llama-server`, built by scripts/llama-server.sh from the llama.cpp that the pinned
llama-cpp-python vendors), started on loopback with SmolLM2-135M. Eight concurrent /evaluate
requests overlap on the engine (its own /slots say how many it processes at once), and killing
one of two replicas mid-load fails over to the other, with no 'allow' among the failures.
Without the binary these skip and say why (llama-cpp-python's server serves one request at a
time, so it cannot show overlap)."""

from __future__ import annotations

import asyncio
import signal
import time
from collections.abc import Iterator
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.app import create_app
from service.ops.weights import ModelStore
from service.settings import TierSettings, load_settings
from tests.conftest import fake_settings, running_app, sample_request
from tests.realserver import SlotWatch, llama_server, llama_server_binary

BINARY = llama_server_binary()
pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(
        BINARY is None,
        reason="no llama-server: scripts/llama-server.sh builds it (test.sh runs it)",
    ),
]

SMOL = "smollm2-135m-instruct-q4_1"
BUDGET_MS = 120_000


@pytest.fixture(scope="module")
def smol_path() -> Path:
    return ModelStore(load_settings()).resolve(SMOL)


def _settings(urls: list[str], **tier: Any) -> Any:
    return fake_settings(
        tiers={
            "strategic": TierSettings(
                backend="openai",
                base_urls=urls,
                remote_model="smollm2",
                n_ctx=2048,
                max_tokens=160,
                rationale_chars=120,
                health_interval_s=0.5,
                eject_s=60,
                **tier,
            )
        },
        default_tier="strategic",
    )


async def _evaluate(client: httpx.AsyncClient, index: int) -> dict[str, Any]:
    body = sample_request(
        latency_budget_ms=BUDGET_MS,
        action={"tool": "shell", "arguments": {"cmd": f"rm -rf /home/user{index}/*"}},
    )
    response = await client.post("/evaluate", json=body, timeout=BUDGET_MS / 1000 + 10)
    assert response.status_code == 200
    return dict(response.json())


@pytest.fixture(scope="module")
def engine(smol_path: Path) -> Iterator[str]:
    assert BINARY is not None
    with llama_server(BINARY, smol_path, alias="smollm2", parallel=8) as (url, _proc):
        yield url


async def test_eight_concurrent_evaluations_overlap_on_the_engines_slots(engine: str) -> None:
    async with running_app(create_app(_settings([engine]))) as client:
        with SlotWatch(engine) as watch:
            started = time.monotonic()
            bodies = await asyncio.gather(*(_evaluate(client, i) for i in range(8)))
            took = time.monotonic() - started
    print(f"8 concurrent /evaluate in {took:.1f} s; engine slots busy at once: {watch.peak}")
    assert watch.peak >= 6, watch.peak  # the engine processed them together, not in turn
    for body in bodies:
        assert body["degraded"] is False or body["decision"] != "allow", body
        assert body.get("reason") != "model_error", body


async def test_killing_a_replica_mid_load_fails_over_with_no_allow(smol_path: Path) -> None:
    assert BINARY is not None
    with (
        llama_server(BINARY, smol_path, alias="smollm2", parallel=4) as (doomed, proc),
        llama_server(BINARY, smol_path, alias="smollm2", parallel=4) as (survivor, _),
    ):
        async with running_app(create_app(_settings([doomed, survivor]))) as client:
            with SlotWatch(doomed) as watch:
                pending = [asyncio.create_task(_evaluate(client, i)) for i in range(8)]
                for _ in range(500):  # until the doomed replica is working on some
                    if watch.peak > 0:
                        break
                    await asyncio.sleep(0.02)
                proc.send_signal(signal.SIGKILL)
                killed_at = time.monotonic()
                bodies = await asyncio.gather(*pending)
                failover_s = time.monotonic() - killed_at
            metrics = (await client.get("/metrics")).text
    print(f"killed with {watch.peak} in flight there; all answered {failover_s:.1f} s later")
    assert watch.peak > 0
    assert failover_s < BUDGET_MS / 1000  # within one request's timeout
    assert 'event="ejected"' in metrics
    for body in bodies:
        assert body["degraded"] is False or body["decision"] != "allow", body
        # the kill cost no request its answer: every one was resent to the survivor
        assert body.get("reason") not in ("model_error", "model_unavailable"), body
