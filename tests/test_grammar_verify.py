"""The per-request constraint and the check of the model's answer (no model needed)."""

from __future__ import annotations

import json

import pytest

from service.decision.grammar import (
    RESPONSE_PREFIX,
    AnswerShape,
    build_constraint,
    build_gbnf,
    build_schema,
)
from service.decision.verify import InvalidAnswerError, is_complete, parse_answer

SHAPE = AnswerShape(("R1", "GK-02"), (2, 3), max_cited=2, rationale_chars=50, revision_chars=40)


def test_schema_enumerates_exactly_the_supplied_ids_with_bounds() -> None:
    schema = build_schema(SHAPE)
    props = schema["properties"]
    assert props["decision"]["enum"] == ["allow", "deny", "revise", "escalate"]
    assert props["evidence"]["items"]["enum"] == ["R1", "GK-02"]
    assert props["evidence"]["maxItems"] == 2
    assert props["history"]["items"]["enum"] == [2, 3]
    assert props["rationale"]["maxLength"] == 50
    assert schema["additionalProperties"] is False


def test_gbnf_bounds_arrays_and_strings_and_ties_revision_to_revise() -> None:
    gbnf = build_gbnf(SHAPE)
    assert (
        'evidence ::= "[" (("\\"R1\\"" | "\\"GK-02\\"") (", " ("\\"R1\\"" | "\\"GK-02\\"")){0,1})? "]"'
        in gbnf
    )
    assert "char{0,50}" in gbnf and "char{1,40}" in gbnf
    root = gbnf.splitlines()[0]
    plain, revise = root.split(' | "revise')
    assert "revision" not in plain and "revision" in revise


def test_nothing_to_cite_leaves_citation_fields_out() -> None:
    shape = AnswerShape((), (), max_cited=4, rationale_chars=50, revision_chars=40)
    schema = build_schema(shape)
    assert "evidence" not in schema["properties"] and "history" not in schema["properties"]
    assert "evidence" not in build_gbnf(shape)


def test_explain_false_is_decision_only() -> None:
    shape = AnswerShape(("R1",), (1,), 4, 50, 40, explain=False)
    constraint = build_constraint(shape)
    assert set(constraint.schema["properties"]) == {"decision", "revision"}
    assert "rationale" not in constraint.gbnf
    assert constraint.choices == ("allow", "deny", "revise", "escalate")


def _answer(**fields: object) -> str:
    return json.dumps(fields)


def test_parse_accepts_a_valid_answer_and_dedupes_citations() -> None:
    text = _answer(decision="deny", evidence=["R1", "R1"], history=[3], rationale="bad")
    answer = parse_answer(text, SHAPE)
    assert answer.decision == "deny" and answer.evidence == ["R1"] and answer.history == [3]


def test_parse_tolerates_raw_control_characters_in_strings() -> None:
    text = '{"decision": "allow", "evidence": [], "history": [], "rationale": "line\tone\nline"}'
    assert parse_answer(text, SHAPE).rationale == "line\tone\nline"


@pytest.mark.parametrize(
    "text",
    [
        _answer(decision="deny", evidence=["R9"], history=[], rationale=""),
        _answer(decision="deny", evidence=[], history=[1], rationale=""),
        _answer(decision="deny", evidence=["R1", "GK-02", "R1"], history=[], rationale="").replace(
            '"R1"]', '"X"]'
        ),
        _answer(decision="revise", evidence=[], history=[], rationale=""),
        _answer(decision="allow", evidence=[], history=[], rationale="", revision="do x"),
        _answer(decision="maybe", evidence=[], history=[], rationale=""),
        _answer(decision="deny", evidence=[], history=[], rationale="x" * 51),
        '{"decision": "deny", "evidence": [',
        "",
    ],
)
def test_parse_rejects_what_breaks_the_shape(text: str) -> None:
    with pytest.raises(InvalidAnswerError):
        parse_answer(text, SHAPE)


def test_is_complete_only_for_a_whole_object() -> None:
    assert not is_complete(RESPONSE_PREFIX + 'deny", "rationale": "a } b')
    assert is_complete(RESPONSE_PREFIX + 'deny", "rationale": "a } b"}')
