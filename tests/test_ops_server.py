"""Operations against a real `gatekeeper serve` process on a real model (SmolLM2-135M, answers
without a rationale to keep each request short): no acknowledged decision is lost to kill -9,
and SIGTERM drains (in-flight answered, queued ones answered fail-closed, log flushed, exit 0)."""

from __future__ import annotations

import math
import signal
import sqlite3
import threading
import time
from pathlib import Path
from typing import Any

import httpx
import pytest

from service.ops.audit import AuditQuery, read_decisions
from tests.conftest import sample_request
from tests.realserver import gatekeeper_server

pytestmark = pytest.mark.model


def _env(log: Path, **extra: str) -> dict[str, str]:
    return {
        "GATEKEEPER_TIERS__EDGE__MODEL": "smollm2-135m-instruct-q4_1",
        "GATEKEEPER_LOAD_TIERS": '["edge"]',
        "GATEKEEPER_TIERS__EDGE__MAX_QUEUE": "64",
        "GATEKEEPER_AUDIT__PATH": str(log),
        **extra,
    }


class Load:
    """`clients` threads posting requests d-0 .. d-(total-1), recording what came back."""

    def __init__(self, url: str, total: int, clients: int, *, explain: bool = False) -> None:
        self.url = url
        self.total = total
        self.explain = explain
        self.answers: dict[str, dict[str, Any]] = {}
        self.failures: dict[str, str] = {}
        self._next = 0
        self._lock = threading.Lock()
        self.threads = [threading.Thread(target=self._client, daemon=True) for _ in range(clients)]

    def start(self) -> Load:
        for thread in self.threads:
            thread.start()
        return self

    def join(self, timeout: float = 120.0) -> None:
        for thread in self.threads:
            thread.join(timeout)

    def _take(self) -> str | None:
        with self._lock:
            if self._next >= self.total:
                return None
            self._next += 1
            return f"d-{self._next - 1}"

    def _client(self) -> None:
        with httpx.Client(base_url=self.url, timeout=120) as client:
            while (request_id := self._take()) is not None:
                # a generous budget: queued requests must wait, not be refused by the router
                body = sample_request(
                    request_id=request_id, explain=self.explain, latency_budget_ms=600_000
                )
                try:
                    response = client.post("/evaluate", json=body)
                except httpx.HTTPError as exc:
                    with self._lock:
                        self.failures[request_id] = type(exc).__name__
                    continue
                with self._lock:
                    if response.status_code == 200:
                        self.answers[request_id] = response.json()
                    else:
                        self.failures[request_id] = str(response.status_code)


def _logged(path: Path) -> dict[str, Any]:
    return {r.request_id: r for r in read_decisions(path, AuditQuery(limit=10_000))}


def test_kill_9_mid_load_loses_no_acknowledged_decision(tmp_path: Path) -> None:
    log = tmp_path / "decisions.db"
    with gatekeeper_server(_env(log)) as (url, proc):
        load = Load(url, total=40, clients=4).start()
        deadline = time.monotonic() + 180
        while len(load.answers) < 12 and time.monotonic() < deadline:
            time.sleep(0.02)
        proc.send_signal(signal.SIGKILL)
        proc.wait(10)
        load.join()
    assert proc.returncode == -signal.SIGKILL
    received = dict(load.answers)
    assert 12 <= len(received) < 40, "the kill must land mid-load"
    assert load.failures, "requests after the kill fail at the client"
    logged = _logged(log)
    missing = set(received) - set(logged)
    assert not missing, f"acknowledged but not in the log: {sorted(missing)}"
    for request_id, answer in received.items():
        record = logged[request_id]
        assert record.decision == answer["decision"]
        assert record.degraded == answer["degraded"]
        assert record.tier == answer["tier"] == "edge"
        assert record.evidence_ids == [e["id"] for e in answer["evidence"]]


def _queue_depth(url: str) -> float:
    metrics = httpx.get(f"{url}/metrics", timeout=5).text
    for line in metrics.splitlines():
        if line.startswith('gatekeeper_queue_depth{tier="edge"}'):
            return float(line.split()[-1])
    return 0.0


def test_sigterm_drains_answers_everything_flushes_the_log_and_exits_0(tmp_path: Path) -> None:
    log = tmp_path / "decisions.db"
    grace_s = 5.0
    # revision on, as shipped: it runs in the decision's own worker job, so the request in
    # flight at SIGTERM never waits behind the queue for its revision
    env = _env(log, GATEKEEPER_SHUTDOWN_GRACE_S=str(grace_s))
    with gatekeeper_server(env) as (url, proc):
        # a cold request fills the prompt cache; a warm one measures a request's time, so
        # that enough requests queue up to outlast the grace on a fast machine or a slow one.
        # With a rationale: decoding is never cached, so a warm request is not near-instant
        # (the count of queued requests is capped, and must still outlast the grace)
        for request_id in ("cold", "warm"):
            body = sample_request(request_id=request_id, explain=True, latency_budget_ms=600_000)
            started = time.monotonic()
            assert httpx.post(f"{url}/evaluate", json=body, timeout=120).status_code == 200
            one_s = time.monotonic() - started
        assert one_s < grace_s, "a request must fit in the grace for this test to mean much"
        total = min(60, math.ceil(3 * grace_s / one_s) + 2)
        load = Load(url, total=total, clients=total, explain=True).start()
        deadline = time.monotonic() + 30
        while _queue_depth(url) < total and time.monotonic() < deadline:
            time.sleep(0.05)  # all admitted: one generating, the rest queued behind it
        began = time.monotonic()
        proc.send_signal(signal.SIGTERM)
        time.sleep(0.3)
        with pytest.raises(httpx.TransportError):  # no longer accepting
            httpx.get(f"{url}/healthz", timeout=2)
        load.join()
        answered_in = time.monotonic() - began
        status = proc.wait(30)
    assert status == 0
    assert not load.failures, load.failures
    answers = load.answers
    assert len(answers) == total  # none dropped
    normal = [a for a in answers.values() if not a["degraded"]]
    cut = [a for a in answers.values() if a["degraded"]]
    assert normal, "the request in flight at SIGTERM finishes"
    assert cut, "the requests still queued at the end of the grace are answered fail-closed"
    assert all(a["reason"] == "shutting_down" and a["decision"] == "escalate" for a in cut), [
        a["reason"] for a in cut
    ]
    assert grace_s <= answered_in < grace_s + 5
    logged = _logged(log)
    assert set(logged) == set(answers) | {"cold", "warm"}
    assert sum(r.reason == "shutting_down" for r in logged.values()) == len(cut)
    # flushed: the WAL was folded into the database at shutdown
    wal = log.with_name(log.name + "-wal")
    assert not wal.exists() or wal.stat().st_size == 0
    with sqlite3.connect(log) as conn:
        assert conn.execute("PRAGMA integrity_check").fetchone()[0] == "ok"
