"""Agent-safety records in the R-Judge / ASSEBench shape, turned into /evaluate requests, and a
fixed, seeded split into a tuning part and a reporting part."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Callable
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.schemas import Agent, EvaluateRequest, TextAction, Turn

SPLIT_SEED = "gatekeeper-split-1"
REPORT_PERCENT = 30


@dataclass(frozen=True)
class Record:
    id: str
    unsafe: bool
    request: EvaluateRequest
    raw: dict[str, Any]


def _agent_action(turn: dict[str, Any]) -> str:
    return str(turn.get("action") or turn.get("content") or "").strip()


def to_request(raw: dict[str, Any]) -> EvaluateRequest:
    """The agent's last action becomes `action`, the turns before it `history` (with the
    thought that came with the action as the last agent turn), the user's first message
    `goal`, and `profile` goes into `agent`."""
    turns: list[dict[str, Any]] = [t for episode in raw["contents"] for t in episode]
    last = max(
        (i for i, t in enumerate(turns) if t.get("role") == "agent" and _agent_action(t)),
        default=None,
    )
    goal = next((str(t.get("content", "")) for t in turns if t.get("role") == "user"), "")
    if last is None:  # no agent action: judge the agent's final message
        last, action = len(turns), TextAction(text="(no action)")
    else:
        action = TextAction(text=_agent_action(turns[last]))
    history = []
    context = turns[:last]
    if last < len(turns) and str(turns[last].get("thought") or "").strip():
        # the agent's reasoning for the action it proposes (in ASSEBench often the observation
        # that led to it) belongs with the context the judge reads
        context = [*context, {"role": "agent", "thought": turns[last]["thought"]}]
    for t in context:
        role = t.get("role", "environment")
        if role == "agent":
            history.append(
                Turn(
                    role="agent",
                    content=str(t.get("content") or ""),
                    thought=str(t.get("thought") or "") or None,
                    action=str(t.get("action") or "") or None,
                )
            )
        else:
            history.append(
                Turn(
                    role=role if role in ("user", "tool", "environment") else "environment",
                    content=str(t.get("content") or ""),
                )
            )
    return EvaluateRequest(
        request_id=request_id(str(raw["id"])),
        agent=Agent(id="assebench", profile=str(raw.get("profile") or "")[:20_000]),
        goal=goal[:20_000],
        history=history[-200:],
        action=action,
    )


def request_id(record_id: str) -> str:
    """`rec-<id>` where that is a valid request id, else a readable head and a hash of the id
    (ToolEmu's ids name the agent model and run the id past 64 characters)."""
    rid = "rec-" + re.sub(r"[^A-Za-z0-9_.:\-]", "_", record_id)
    if len(rid) <= 64:
        return rid
    return f"{rid[:47]}-{hashlib.sha256(record_id.encode()).hexdigest()[:16]}"


def load_records(
    path: Path, clean: Callable[[dict[str, Any]], dict[str, Any]] | None = None
) -> list[Record]:
    """The records of a file; `clean` rewrites each raw record first (a source's format
    markers, say) and the record keeps the cleaned form."""
    raw_records = json.loads(path.read_text("utf-8"))
    if clean is not None:
        raw_records = [clean(r) for r in raw_records]
    return [Record(str(r["id"]), int(r["label"]) == 1, to_request(r), r) for r in raw_records]


def is_reporting(record_id: str, seed: str = SPLIT_SEED, percent: int = REPORT_PERCENT) -> bool:
    digest = hashlib.sha256(f"{seed}:{record_id}".encode()).digest()
    return int.from_bytes(digest[:4], "big") % 100 < percent


def split(records: list[Record]) -> tuple[list[Record], list[Record]]:
    """(tuning, reporting): stable under reordering and additions, by a hash of each id."""
    tuning = [r for r in records if not is_reporting(r.id)]
    reporting = [r for r in records if is_reporting(r.id)]
    return tuning, reporting
