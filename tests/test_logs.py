"""Structured logs: every record emitted while a request is handled carries its request id,
and request content stays out of the logs unless redaction is turned off."""

from __future__ import annotations

import io
import json
import logging
from pathlib import Path

import pytest

from service.backends.fake import FakeBackend, Script
from service.ops.logs import JsonFormatter, RequestIdFilter, request_context
from tests.conftest import answer, fake_app, sample_request


def test_records_inside_a_request_carry_its_id() -> None:
    stream = io.StringIO()
    handler = logging.StreamHandler(stream)
    handler.setFormatter(JsonFormatter())
    handler.addFilter(RequestIdFilter())
    logger = logging.getLogger("tests.logs.request_id")
    logger.addHandler(handler)
    logger.propagate = False
    try:
        with request_context("req-42"):
            logger.warning("inside")
            logger.warning("explicit", extra={"request_id": "other"})
        logger.warning("outside")
    finally:
        logger.removeHandler(handler)
    inside, explicit, outside = (json.loads(line) for line in stream.getvalue().splitlines())
    assert inside["request_id"] == "req-42" and inside["message"] == "inside"
    assert explicit["request_id"] == "other"
    assert "request_id" not in outside


@pytest.mark.parametrize("redact", [True, False])
async def test_decision_log_line_has_the_id_and_content_only_unredacted(
    redact: bool, tmp_path: Path, caplog: pytest.LogCaptureFixture
) -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", ["R1"], []))])
    caplog.set_level(logging.INFO, logger="service.api.serving")
    audit = {"path": tmp_path / "d.db", "redact": redact}
    async with fake_app({"edge": backend}, audit=audit) as client:
        response = await client.post("/evaluate", json=sample_request(request_id="log-1"))
    assert response.status_code == 200
    [record] = [r for r in caplog.records if r.name == "service.api.serving"]
    assert record.getMessage() == "decision"
    assert record.request_id == "log-1"  # type: ignore[attr-defined]
    assert record.decision == "deny"  # type: ignore[attr-defined]
    text = JsonFormatter().format(record)
    assert ("rm -rf /home/*" in text) is (not redact)
