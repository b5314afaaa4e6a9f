from __future__ import annotations

import asyncio
import json
from collections.abc import AsyncIterator, Mapping
from contextlib import asynccontextmanager
from pathlib import Path
from typing import Any

import httpx
import pytest
from fastapi import FastAPI

from service.app import create_app
from service.backends.base import Backend
from service.settings import Settings, TierSettings

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"


def fake_settings(**overrides: Any) -> Settings:
    """Settings with fake tiers only: no model files, no environment surprises."""
    values: dict[str, Any] = {
        "tiers": {"edge": TierSettings(backend="fake"), "mid": TierSettings(backend="fake")},
        "models": {},
        "default_tier": "edge",
        "log_format": "text",
        "warmup": False,
        "audit": {"enabled": False},  # tests that check the log give it a tmp_path
    }
    values.update(overrides)
    return Settings(**values)


def answer(
    decision: str = "deny",
    evidence: list[str] | None = None,
    history: list[int] | None = None,
    rationale: str = "Deleting the home folder without consent breaks GK-04.",
    revision: str | None = None,
) -> str:
    """The text a model generates after the prompt's `{"decision": "` prefix."""
    body: dict[str, Any] = {"decision": decision}
    if evidence is not None:
        body["evidence"] = evidence
    if history is not None:
        body["history"] = history
    body["rationale"] = rationale
    if revision is not None:
        body["revision"] = revision
    text = json.dumps(body)
    prefix = '{"decision": "'
    assert text.startswith(prefix)
    return text[len(prefix) :]


def sample_request(**overrides: Any) -> dict[str, Any]:
    body: dict[str, Any] = {
        "agent": {"id": "agent-7", "profile": "A coding assistant with shell access."},
        "goal": "Free up disk space on my laptop.",
        "history": [
            {"role": "user", "content": "My disk is full, please clean it."},
            {"role": "agent", "thought": "Check usage first", "action": "du -sh /*"},
            {"role": "environment", "content": "/home 200G\n/var 20G"},
        ],
        "action": {"tool": "shell", "arguments": {"cmd": "rm -rf /home/*"}},
        "evidence": [
            {"id": "R1", "text": "Never delete user files without explicit confirmation."},
            {
                "id": "T1",
                "subject": "agent",
                "predicate": "must_not",
                "object": "exfiltrate secrets",
            },
        ],
    }
    body.update(overrides)
    return body


@asynccontextmanager
async def running_app(app: FastAPI, *, wait_ready: bool = True) -> AsyncIterator[httpx.AsyncClient]:
    async with app.router.lifespan_context(app):
        transport = httpx.ASGITransport(app=app)
        async with httpx.AsyncClient(transport=transport, base_url="http://gatekeeper") as client:
            if wait_ready:
                for _ in range(200):
                    if (await client.get("/readyz")).status_code == 200:
                        break
                    await asyncio.sleep(0.01)
            yield client


@asynccontextmanager
async def fake_app(
    backends: Mapping[str, Backend], **settings: Any
) -> AsyncIterator[httpx.AsyncClient]:
    async with running_app(create_app(fake_settings(**settings), backends)) as client:
        yield client


@pytest.fixture
def anyio_backend() -> str:
    return "asyncio"
