"""Check the model's answer after generation, even though the grammar should guarantee it:
engines differ in what their grammars enforce, and the contract must hold regardless."""

from __future__ import annotations

import json

from pydantic import BaseModel, ConfigDict, ValidationError

from service.decision.grammar import AnswerShape
from service.schemas import Decision


class InvalidAnswerError(Exception):
    """The output does not parse or breaks the request's answer shape."""


class ModelAnswer(BaseModel):
    model_config = ConfigDict(extra="forbid")

    decision: Decision
    evidence: list[str] = []
    history: list[int] = []
    rationale: str = ""
    revision: str | None = None


def is_complete(text: str) -> bool:
    """True once `text` is a whole JSON object (cheap enough to call on each closing brace)."""
    if not text.endswith("}"):
        return False
    try:
        json.loads(text, strict=False)
    except ValueError:
        return False
    return True


def parse_answer(text: str, shape: AnswerShape) -> ModelAnswer:
    # strict=False: llama.cpp's JSON grammars let raw control characters into strings
    try:
        answer = ModelAnswer.model_validate(json.loads(text, strict=False))
    except (ValueError, ValidationError) as exc:
        raise InvalidAnswerError(f"unparseable answer: {exc}") from exc
    unknown = set(answer.evidence) - set(shape.evidence_ids)
    if unknown:
        raise InvalidAnswerError(f"cites evidence that was not supplied: {sorted(unknown)}")
    if set(answer.history) - set(shape.history_ids):
        raise InvalidAnswerError("cites history turns that the prompt did not hold")
    if len(answer.evidence) > shape.max_cited or len(answer.history) > shape.max_cited:
        raise InvalidAnswerError("cites more items than allowed")
    if len(answer.rationale) > shape.rationale_chars:
        raise InvalidAnswerError("rationale too long")
    if answer.decision == Decision.REVISE:
        if not answer.revision or not answer.revision.strip():
            raise InvalidAnswerError("'revise' without a revision")
        if len(answer.revision) > shape.revision_chars:
            raise InvalidAnswerError("revision too long")
    elif answer.revision is not None:
        raise InvalidAnswerError("a revision is only allowed with 'revise'")
    answer.evidence = list(dict.fromkeys(answer.evidence))
    answer.history = list(dict.fromkeys(answer.history))
    return answer
