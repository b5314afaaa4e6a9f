"""The revise set (benchmarks/data/revise-set.json): hand-written unsafe /evaluate requests,
each with a safe alternative a careful engineer would accept and a machine-checkable rule of
what a good revision must and must not contain. Written by a session that never saw the
revision prompt (issue #21).

A rule holds `must_contain` (every one must match), `must_not_contain` (none may) and `any_of`
(groups of alternatives: at least one of each group must match; a flat list is one group),
each matched case-insensitively as a substring of the action rendered as text (`action_text`),
or as a regular expression when it starts with `re:`."""

from __future__ import annotations

import json
import re
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from pydantic import TypeAdapter

from service.schemas import EvaluateRequest, ProposedAction, TextAction

DATA = Path(__file__).resolve().parent / "data" / "revise-set.json"
_ACTION: TypeAdapter[ProposedAction] = TypeAdapter(ProposedAction)


def action_text(action: ProposedAction) -> str:
    """How a rule reads an action: the text, or the tool's name and its arguments as JSON."""
    if isinstance(action, TextAction):
        return action.text
    return f"{action.tool} {json.dumps(action.arguments, ensure_ascii=False)}"


def _matches(pattern: str, text: str) -> bool:
    if pattern.startswith("re:"):
        return re.search(pattern[3:], text, re.IGNORECASE) is not None
    return pattern.lower() in text.lower()


@dataclass(frozen=True)
class Rule:
    must_contain: tuple[str, ...] = ()
    must_not_contain: tuple[str, ...] = ()
    any_of: tuple[tuple[str, ...], ...] = ()

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> Rule:
        unknown = set(raw) - {"must_contain", "must_not_contain", "any_of"}
        if unknown:
            raise ValueError(f"unknown rule keys {sorted(unknown)}")
        groups = raw.get("any_of") or []
        if groups and all(isinstance(g, str) for g in groups):
            groups = [groups]
        if not all(isinstance(g, list) and g for g in groups):
            raise ValueError("any_of is a list of non-empty lists of alternatives")
        rule = cls(
            tuple(raw.get("must_contain") or ()),
            tuple(raw.get("must_not_contain") or ()),
            tuple(tuple(g) for g in groups),
        )
        alternatives = [p for group in rule.any_of for p in group]
        for pattern in (*rule.must_contain, *rule.must_not_contain, *alternatives):
            if not isinstance(pattern, str) or not pattern:
                raise ValueError(f"a rule's patterns are non-empty strings, got {pattern!r}")
            if pattern.startswith("re:"):
                try:
                    re.compile(pattern[3:])
                except re.error as exc:
                    raise ValueError(f"bad regex {pattern!r}: {exc}") from exc
        if not (rule.must_contain or rule.must_not_contain or rule.any_of):
            raise ValueError("an empty rule checks nothing")
        return rule

    def passes(self, action: ProposedAction) -> bool:
        text = action_text(action)
        return (
            all(_matches(p, text) for p in self.must_contain)
            and not any(_matches(p, text) for p in self.must_not_contain)
            and all(any(_matches(p, text) for p in group) for group in self.any_of)
        )


@dataclass(frozen=True)
class ReviseCase:
    id: str
    request: EvaluateRequest
    safe_alternative: ProposedAction
    rule: Rule
    raw: dict[str, Any]


def load_revise_set(path: Path = DATA) -> list[ReviseCase]:
    cases = []
    for raw in json.loads(path.read_text("utf-8")):
        case_id = str(raw["id"])
        try:
            cases.append(
                ReviseCase(
                    case_id,
                    EvaluateRequest.model_validate(raw["request"] | {"request_id": case_id}),
                    _ACTION.validate_python(raw["safe_alternative"]),
                    Rule.from_json(raw["rule"]),
                    raw,
                )
            )
        except (KeyError, ValueError) as exc:
            raise ValueError(f"{path.name}: record {case_id}: {exc}") from exc
    return cases
