"""The per-request output constraint: a JSON schema (the contract) and the GBNF grammar that
llama.cpp enforces token by token.

The answer is ordered decision-first, so the decision is read at the first generated position
(its probability gives the confidence) and can be used even if the explanation is cut short.
The prompt already holds the answer's opening `{"decision": "`, which saves the tokens the
grammar would force anyway. Every array and string is bounded: small models fill unbounded
arrays until the token limit."""

from __future__ import annotations

import json
from dataclasses import dataclass
from typing import Any

from service.backends.base import Constraint
from service.schemas import Decision

RESPONSE_PREFIX = '{"decision": "'
DECISIONS: tuple[str, ...] = tuple(d.value for d in Decision)


@dataclass(frozen=True)
class AnswerShape:
    """What one request's answer may contain."""

    evidence_ids: tuple[str, ...]
    history_ids: tuple[int, ...]
    max_cited: int
    rationale_chars: int
    revision_chars: int
    explain: bool = True

    @property
    def cites_evidence(self) -> bool:
        return self.explain and self.max_cited > 0 and bool(self.evidence_ids)

    @property
    def cites_history(self) -> bool:
        return self.explain and self.max_cited > 0 and bool(self.history_ids)


def build_schema(shape: AnswerShape) -> dict[str, Any]:
    properties: dict[str, Any] = {"decision": {"type": "string", "enum": list(DECISIONS)}}
    required = ["decision"]
    if shape.cites_evidence:
        properties["evidence"] = {
            "type": "array",
            "items": {"type": "string", "enum": list(shape.evidence_ids)},
            "maxItems": min(shape.max_cited, len(shape.evidence_ids)),
        }
        required.append("evidence")
    if shape.cites_history:
        properties["history"] = {
            "type": "array",
            "items": {"type": "integer", "enum": list(shape.history_ids)},
            "maxItems": min(shape.max_cited, len(shape.history_ids)),
        }
        required.append("history")
    if shape.explain:
        properties["rationale"] = {"type": "string", "maxLength": shape.rationale_chars}
        required.append("rationale")
    properties["revision"] = {"type": "string", "minLength": 1, "maxLength": shape.revision_chars}
    return {
        "type": "object",
        "properties": properties,
        "required": required,
        "additionalProperties": False,
        # 'revision' exactly when the decision is 'revise'
        "if": {"properties": {"decision": {"const": "revise"}}},
        "then": {"required": ["revision"]},
        "else": {"not": {"required": ["revision"]}},
    }


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF literal uses JSON string escaping


def _array(items: list[str], max_items: int) -> str:
    item = "(" + " | ".join(items) + ")"
    if max_items <= 1:
        return f'"[" {item}? "]"'
    return f'"[" ({item} (", " {item}){{0,{max_items - 1}}})? "]"'


def build_gbnf(shape: AnswerShape) -> str:
    """Grammar for the text after RESPONSE_PREFIX."""
    rules: dict[str, str] = {}
    rest = ""
    if shape.cites_evidence:
        ids = [_literal(json.dumps(i)) for i in shape.evidence_ids]
        rules["evidence"] = _array(ids, min(shape.max_cited, len(ids)))
        rest += ' ", \\"evidence\\": " evidence'
    if shape.cites_history:
        ids = [_literal(str(i)) for i in shape.history_ids]
        rules["history"] = _array(ids, min(shape.max_cited, len(ids)))
        rest += ' ", \\"history\\": " history'
    if shape.explain:
        rules["rationale"] = f'"\\"" char{{0,{shape.rationale_chars}}} "\\""'
        rest += ' ", \\"rationale\\": " rationale'
    rules["revision"] = f'"\\"" char{{1,{shape.revision_chars}}} "\\""'
    # No control characters, quotes or backslashes: escapes are rare in a rationale and
    # allowing them lets a small model wander into "\\\\\\..." runs.
    rules["char"] = r'[^"\\\x00-\x1F\x7F]'
    plain = " | ".join(_literal(d) for d in DECISIONS if d != Decision.REVISE)
    root = (
        f'root ::= ({plain}) "\\""{rest} "}}" | '
        f'"revise\\""{rest} ", \\"revision\\": " revision "}}"'
    )
    return "\n".join([root, *(f"{name} ::= {body}" for name, body in rules.items())]) + "\n"


def build_constraint(shape: AnswerShape) -> Constraint:
    return Constraint(schema=build_schema(shape), gbnf=build_gbnf(shape), choices=DECISIONS)


def max_answer_chars(shape: AnswerShape) -> int:
    """An upper bound on the answer's length, used to size the token budget."""
    ids = sum(len(json.dumps(i)) + 2 for i in shape.evidence_ids[: shape.max_cited])
    hist = sum(len(str(i)) + 2 for i in shape.history_ids[: shape.max_cited])
    return len(RESPONSE_PREFIX) + 80 + ids + hist + shape.rationale_chars + shape.revision_chars
