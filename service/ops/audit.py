"""The durable decision log: one SQLite row per decision, committed (WAL, synchronous=FULL)
before the decision is sent, so that no acknowledged decision is ever lost, even to kill -9.

SQLite rather than JSONL: it is in the standard library, a commit is durable on return, and
`gatekeeper audit` can filter by request id, decision, tier or time without reading it all."""

from __future__ import annotations

import asyncio
import hashlib
import json
import sqlite3
from concurrent.futures import ThreadPoolExecutor
from dataclasses import asdict, dataclass, fields
from datetime import UTC, datetime
from pathlib import Path
from typing import Any

from service.errors import DecisionLogError
from service.schemas import EvaluateRequest, EvaluateResponse

_SCHEMA = """
CREATE TABLE IF NOT EXISTS decisions (
    seq INTEGER PRIMARY KEY AUTOINCREMENT,
    ts TEXT NOT NULL,
    request_id TEXT NOT NULL,
    request_sha256 TEXT NOT NULL,
    agent_id TEXT NOT NULL,
    api_key_id TEXT,
    decision TEXT NOT NULL,
    confidence REAL NOT NULL,
    evidence_ids TEXT NOT NULL,
    tier TEXT,
    model TEXT,
    degraded INTEGER NOT NULL,
    reason TEXT,
    queue_ms REAL NOT NULL,
    prefill_ms REAL NOT NULL,
    decode_ms REAL NOT NULL,
    total_ms REAL NOT NULL,
    request TEXT,
    rationale TEXT
);
CREATE INDEX IF NOT EXISTS decisions_request_id ON decisions (request_id);
CREATE INDEX IF NOT EXISTS decisions_ts ON decisions (ts);
"""


def request_sha256(request: EvaluateRequest) -> str:
    """A stable hash of the request's content (its id left out): equal requests, equal hashes."""
    content = request.model_dump(mode="json", exclude={"request_id"})
    canonical = json.dumps(content, sort_keys=True, separators=(",", ":"), ensure_ascii=False)
    return hashlib.sha256(canonical.encode()).hexdigest()


@dataclass(frozen=True)
class DecisionRecord:
    ts: str
    request_id: str
    request_sha256: str
    agent_id: str
    api_key_id: str | None
    decision: str
    confidence: float
    evidence_ids: list[str]
    tier: str | None
    model: str | None
    degraded: bool
    reason: str | None
    queue_ms: float
    prefill_ms: float
    decode_ms: float
    total_ms: float
    request: str | None = None  # the request as JSON, only when redaction is off
    rationale: str | None = None  # only when redaction is off: it may quote the request

    @classmethod
    def of(
        cls,
        request: EvaluateRequest,
        response: EvaluateResponse,
        api_key_id: str | None,
        *,
        redact: bool,
    ) -> DecisionRecord:
        t = response.timing
        return cls(
            ts=datetime.now(UTC).isoformat(timespec="milliseconds"),
            request_id=response.request_id,
            request_sha256=request_sha256(request),
            agent_id=request.agent.id,
            api_key_id=api_key_id,
            decision=response.decision.value,
            confidence=response.confidence,
            evidence_ids=[item.id for item in response.evidence],
            tier=response.tier,
            model=response.model,
            degraded=response.degraded,
            reason=response.reason.value if response.reason else None,
            queue_ms=round(t.queue_ms, 1),
            prefill_ms=round(t.prefill_ms, 1),
            decode_ms=round(t.decode_ms, 1),
            total_ms=round(t.total_ms, 1),
            request=None if redact else request.model_dump_json(exclude_none=True),
            rationale=None if redact else response.rationale,
        )

    def row(self) -> dict[str, Any]:
        values = asdict(self)
        values["evidence_ids"] = json.dumps(self.evidence_ids)
        values["degraded"] = int(self.degraded)
        return values

    @classmethod
    def from_row(cls, row: sqlite3.Row) -> DecisionRecord:
        values = {f.name: row[f.name] for f in fields(cls)}
        values["evidence_ids"] = json.loads(values["evidence_ids"])
        values["degraded"] = bool(values["degraded"])
        return cls(**values)


_COLUMNS = [f.name for f in fields(DecisionRecord)]
_INSERT = (
    f"INSERT INTO decisions ({', '.join(_COLUMNS)}) VALUES ({', '.join(':' + c for c in _COLUMNS)})"
)


def _connect(path: Path) -> sqlite3.Connection:
    path.parent.mkdir(parents=True, exist_ok=True)
    conn = sqlite3.connect(path, isolation_level=None, check_same_thread=False)
    conn.execute("PRAGMA journal_mode=WAL")
    # FULL: the WAL is fsynced at every commit, so a committed decision survives a crash of the
    # process and of the machine alike.
    conn.execute("PRAGMA synchronous=FULL")
    conn.executescript(_SCHEMA)
    return conn


class DecisionLog:
    """Appends run on one dedicated thread (the event loop never blocks on fsync), and
    `append` returns only once the row is committed."""

    def __init__(self, path: Path) -> None:
        self.path = path
        self._conn = _connect(path)
        self._writer = ThreadPoolExecutor(max_workers=1, thread_name_prefix="decision-log")
        self._closed = False

    def _write(self, record: DecisionRecord) -> None:
        # autocommit: the INSERT is its own transaction, committed (and fsynced) on return
        self._conn.execute(_INSERT, record.row())

    async def append(self, record: DecisionRecord) -> None:
        if self._closed:
            raise DecisionLogError("the decision log is closed")
        loop = asyncio.get_running_loop()
        try:
            await loop.run_in_executor(self._writer, self._write, record)
        except sqlite3.Error as exc:
            raise DecisionLogError(f"the decision log cannot be written: {exc}") from exc

    def close(self) -> None:
        """Wait for pending appends, fold the WAL into the database, and close."""
        if self._closed:
            return
        self._closed = True
        self._writer.shutdown(wait=True)
        try:
            self._conn.execute("PRAGMA wal_checkpoint(TRUNCATE)")
        finally:
            self._conn.close()


@dataclass(frozen=True)
class AuditQuery:
    request_id: str | None = None
    decision: str | None = None
    tier: str | None = None
    api_key_id: str | None = None
    degraded: bool | None = None
    reason: str | None = None
    since: str | None = None  # ISO 8601, compared with `ts` (UTC)
    limit: int = 50


def read_decisions(path: Path, query: AuditQuery) -> list[DecisionRecord]:
    """The newest matching decisions first. Opens the log read-only."""
    if not path.is_file():
        raise DecisionLogError(f"no decision log at {path}")
    where: list[str] = []
    params: list[Any] = []
    for column in ("request_id", "decision", "tier", "api_key_id", "reason"):
        value = getattr(query, column)
        if value is not None:
            where.append(f"{column} = ?")
            params.append(value)
    if query.degraded is not None:
        where.append("degraded = ?")
        params.append(int(query.degraded))
    if query.since is not None:
        where.append("ts >= ?")
        params.append(_utc(query.since))
    sql = "SELECT * FROM decisions" + (f" WHERE {' AND '.join(where)}" if where else "")
    sql += " ORDER BY seq DESC LIMIT ?"
    params.append(query.limit)
    conn = sqlite3.connect(f"file:{path}?mode=ro", uri=True)
    try:
        conn.row_factory = sqlite3.Row
        return [DecisionRecord.from_row(row) for row in conn.execute(sql, params)]
    except sqlite3.Error as exc:
        raise DecisionLogError(f"cannot read {path}: {exc}") from exc
    finally:
        conn.close()


def _utc(moment: str) -> str:
    try:
        parsed = datetime.fromisoformat(moment)
    except ValueError as exc:
        raise DecisionLogError(f"not an ISO 8601 time: {moment!r}") from exc
    if parsed.tzinfo is None:
        parsed = parsed.replace(tzinfo=UTC)
    return parsed.astimezone(UTC).isoformat(timespec="milliseconds")
