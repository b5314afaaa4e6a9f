"""The decision log: durable SQLite rows, redaction, filters, the `audit` command, and the
API's promise that a decision is committed before it is returned."""

from __future__ import annotations

import json
import sqlite3
from pathlib import Path

import pytest

from service.backends.fake import FakeBackend, Script
from service.cli.main import main
from service.errors import DecisionLogError
from service.ops.audit import (
    AuditQuery,
    DecisionLog,
    DecisionRecord,
    read_decisions,
    request_sha256,
)
from service.schemas import DegradedReason, EvaluateRequest, EvaluateResponse, Timing
from tests.conftest import answer, fake_app, sample_request


def _response(request_id: str, decision: str = "deny", **extra: object) -> EvaluateResponse:
    return EvaluateResponse.model_validate(
        {
            "request_id": request_id,
            "decision": decision,
            "confidence": 0.8,
            "evidence": [{"id": "R1", "text": "Never delete user files."}],
            "rationale": "It deletes /home, which R1 forbids.",
            "tier": "edge",
            "model": "m",
            "timing": Timing(queue_ms=1.0, prefill_ms=20.0, decode_ms=30.0, total_ms=51.26),
            **extra,
        }
    )


def _request(**overrides: object) -> EvaluateRequest:
    return EvaluateRequest.model_validate(sample_request(**overrides))


def test_request_hash_ignores_the_id_and_sees_the_content() -> None:
    a = request_sha256(_request(request_id="a"))
    assert a == request_sha256(_request(request_id="b"))
    assert a != request_sha256(_request(action={"text": "ls"}))
    assert len(a) == 64


async def test_log_round_trips_records_and_redacts_content(tmp_path: Path) -> None:
    path = tmp_path / "state" / "decisions.db"
    log = DecisionLog(path)
    redacted = DecisionRecord.of(_request(), _response("r-1"), "key-a", redact=True)
    full = DecisionRecord.of(_request(), _response("r-2", "allow"), None, redact=False)
    await log.append(redacted)
    await log.append(full)
    log.close()
    by_id = {r.request_id: r for r in read_decisions(path, AuditQuery())}
    assert by_id["r-1"] == redacted
    assert by_id["r-1"].request is None and by_id["r-1"].rationale is None
    assert by_id["r-1"].evidence_ids == ["R1"] and by_id["r-1"].api_key_id == "key-a"
    assert by_id["r-1"].total_ms == pytest.approx(51.3)
    assert by_id["r-2"].request is not None and "rm -rf /home/*" in by_id["r-2"].request
    assert by_id["r-2"].rationale == "It deletes /home, which R1 forbids."
    # nothing of the request's content is stored when redacted
    raw = path.read_bytes()
    assert raw.count(b"rm -rf /home/*") == 1  # r-2's copy only


async def test_log_is_wal_with_full_sync_and_survives_reopening(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    log = DecisionLog(path)
    assert log._conn.execute("PRAGMA journal_mode").fetchone()[0] == "wal"
    assert log._conn.execute("PRAGMA synchronous").fetchone()[0] == 2  # FULL
    await log.append(DecisionRecord.of(_request(), _response("r-1"), None, redact=True))
    # a second process reading while the writer is open sees the committed row
    assert [r.request_id for r in read_decisions(path, AuditQuery())] == ["r-1"]
    log.close()
    log = DecisionLog(path)
    await log.append(DecisionRecord.of(_request(), _response("r-2"), None, redact=True))
    log.close()
    assert [r.request_id for r in read_decisions(path, AuditQuery())] == ["r-2", "r-1"]
    with pytest.raises(DecisionLogError):
        await log.append(DecisionRecord.of(_request(), _response("r-3"), None, redact=True))


async def test_filters_select_by_decision_degraded_key_and_time(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    log = DecisionLog(path)
    failed = _response("r-2", "escalate", degraded=True, reason=DegradedReason.DEADLINE)
    for request_id, response, key in (
        ("r-1", _response("r-1", "allow"), "a"),
        ("r-2", failed, "b"),
        ("r-3", _response("r-3", "deny"), "a"),
    ):
        await log.append(
            DecisionRecord.of(_request(request_id=request_id), response, key, redact=True)
        )
    log.close()

    def ids(**query: object) -> list[str]:
        return [r.request_id for r in read_decisions(path, AuditQuery(**query))]  # type: ignore[arg-type]

    assert ids() == ["r-3", "r-2", "r-1"]
    assert ids(decision="allow") == ["r-1"]
    assert ids(degraded=True) == ["r-2"] and ids(reason="deadline") == ["r-2"]
    assert ids(degraded=False) == ["r-3", "r-1"]
    assert ids(api_key_id="a", limit=1) == ["r-3"]
    assert ids(request_id="r-2") == ["r-2"]
    assert ids(since="2999-01-01T00:00:00") == []
    assert ids(since="2000-01-01T00:00:00+02:00") == ["r-3", "r-2", "r-1"]
    with pytest.raises(DecisionLogError):
        ids(since="yesterday")
    with pytest.raises(DecisionLogError):
        read_decisions(tmp_path / "missing.db", AuditQuery())


async def test_audit_command_lists_and_filters(
    tmp_path: Path, capsys: pytest.CaptureFixture[str]
) -> None:
    path = tmp_path / "d.db"
    log = DecisionLog(path)
    await log.append(DecisionRecord.of(_request(), _response("r-1", "allow"), "a", redact=True))
    await log.append(DecisionRecord.of(_request(), _response("r-2", "deny"), "b", redact=True))
    log.close()
    assert main(["audit", "--path", str(path), "--decision", "deny", "--json"]) == 0
    lines = capsys.readouterr().out.splitlines()
    assert [json.loads(line)["request_id"] for line in lines] == ["r-2"]
    assert main(["audit", "--path", str(path)]) == 0
    table = capsys.readouterr().out
    assert "r-1" in table and "r-2" in table and "R1" in table
    assert main(["audit", "--path", str(tmp_path / "none.db")]) == 2


async def test_api_commits_each_decision_before_answering(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    backend = FakeBackend(scripts=[Script(answer("deny", ["R1"], [1]))])
    async with fake_app({"edge": backend}, audit={"path": path}) as client:
        response = await client.post("/evaluate", json=sample_request(request_id="api-1"))
        assert response.status_code == 200
        # read while the server still runs: the row is already committed
        [record] = read_decisions(path, AuditQuery(request_id="api-1"))
    assert record.decision == "deny" and record.evidence_ids == ["R1"]
    assert record.api_key_id == "anonymous" and record.degraded is False
    assert record.request_sha256 == request_sha256(_request())
    assert record.request is None  # redacted by default


async def test_api_refuses_to_answer_when_the_log_cannot_be_written(tmp_path: Path) -> None:
    path = tmp_path / "d.db"
    backend = FakeBackend(scripts=[Script(answer("allow", [], []))])
    async with fake_app({"edge": backend}, audit={"path": path}) as client:
        with sqlite3.connect(path) as other:  # a real write failure: the table is gone
            other.execute("DROP TABLE decisions")
        response = await client.post("/evaluate", json=sample_request())
    assert response.status_code == 503, response.text
    assert response.json()["error"]["code"] == "decision_log_unavailable"
