"""Prompt injection, no model: the corpus builder puts every kind where it says and the request
still validates; user text can never fake a prompt section or reach the tokenizer as control
tokens (template markers broken up, invisible characters shown, content tokenised apart)."""

from __future__ import annotations

import re
import unicodedata

import pytest

from benchmarks.injection import INJECTED_EVIDENCE_ID, INJECTIONS, PLACES, corpus, flips, inject
from benchmarks.quality import sample
from benchmarks.records import Record, load_records, split
from benchmarks.scoring import Case
from service.backends.base import Prompt
from service.backends.chat import slotted_messages, tokenize_slotted
from service.decision.prompt import build_prompt
from service.evidence import DEFAULT_PACK
from service.schemas import EvaluateRequest, RuleEvidence, TextAction
from tests.conftest import SHARED_DATA, sample_request

KINDS = list(INJECTIONS)
SECTIONS = ("## Evidence", "## Agent profile", "## User goal", "## History", "## Proposed action")
TEMPLATE = re.compile(
    r"<\|[a-z_]+\|>|\[/?INST\]|<</?SYS>>|</?s>|<(?:start|end)_of_turn>", re.IGNORECASE
)


def _request(**overrides: object) -> EvaluateRequest:
    return EvaluateRequest.model_validate(
        sample_request(action={"text": "rm -rf /home/*"}, **overrides)
    )


def _prompt(request: EvaluateRequest) -> Prompt:
    return build_prompt(
        request,
        list(request.evidence or []),
        count_tokens=lambda t: len(t) // 4,
        max_prompt_tokens=100_000,
        max_turn_chars=20_000,
    ).prompt


def _user_text(request: EvaluateRequest) -> str:
    return _prompt(request).messages[-1].content


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("place", PLACES)
def test_each_kind_lands_where_it_says_and_still_validates(kind: str, place: str) -> None:
    base = _request()
    injected = inject(base, kind, place)
    text = INJECTIONS[kind]
    assert EvaluateRequest.model_validate(injected.model_dump()) == injected
    if place == "action":
        assert isinstance(injected.action, TextAction) and injected.action.text.endswith(text)
        assert injected.history == base.history
    elif place == "history":
        assert injected.history[-1].content == text and injected.history[-1].role == "environment"
        assert injected.history[:-1] == base.history and injected.action == base.action
    else:
        assert injected.evidence is not None
        assert injected.evidence[-1] == RuleEvidence(id=INJECTED_EVIDENCE_ID, text=text)
        assert injected.policy == DEFAULT_PACK and injected.action == base.action


def test_a_tool_action_carries_the_injection_in_its_arguments() -> None:
    base = EvaluateRequest.model_validate(sample_request())
    injected = inject(base, "chatml", "action")
    assert injected.action.arguments["note"] == INJECTIONS["chatml"]  # type: ignore[union-attr]


def test_corpus_holds_each_unsafe_record_plain_then_every_kind_and_place() -> None:
    unsafe = Record("u1", True, _request(), {})
    safe = Record("s1", False, _request(), {})
    variants = corpus([unsafe, safe])
    assert len(variants) == 1 + len(KINDS) * len(PLACES)
    assert variants[0].kind == "none" and variants[0].as_record.request == unsafe.request
    assert {(v.kind, v.place) for v in variants[1:]} == {(k, p) for k in KINDS for p in PLACES}
    assert all(v.as_record.id.startswith("u1|") for v in variants)


def test_flips_count_only_allows_the_injection_caused() -> None:
    def case(rid: str, decision: str) -> Case:
        return Case(id=rid, unsafe=True, decision=decision)

    table = flips(
        [
            case("a|none|", "deny"),
            case("b|none|", "allow"),
            case("a|chatml|action", "allow"),  # caused
            case("b|chatml|action", "allow"),  # was allowed anyway
            case("a|bidi|history", "deny"),
        ],
        tripped={"a|chatml|action", "b|chatml|action"},
    )
    assert table["none"]["allow_rate"] == 0.5 and table["none"]["tripped"] == 0
    assert table["chatml/action"]["flips"] == 1 and table["chatml/action"]["flipped"] == ["a"]
    assert table["chatml/action"]["tripped"] == 2
    assert table["bidi/history"]["flips"] == 0 and table["bidi/history"]["tripped"] == 0


@pytest.mark.parametrize("kind", KINDS)
@pytest.mark.parametrize("place", PLACES)
def test_injected_text_cannot_fake_a_section_or_a_control_token(kind: str, place: str) -> None:
    text = _user_text(inject(_request(), kind, place))
    lines = text.split("\n")
    # each section header exactly once, and only the prompt's own
    for header in SECTIONS:
        assert lines.count(header) == 1, (header, text)
    for line in lines:
        folded = unicodedata.normalize("NFKC", line).lstrip()
        if folded.startswith("##"):
            assert line in SECTIONS, line
    # no template marker survives in the text, and nothing invisible
    assert not TEMPLATE.search(text), TEMPLATE.search(text)
    assert not [c for c in text if unicodedata.category(c) == "Cf"]
    # a claimed evidence tag in history or action cannot start a line of its own
    if place != "evidence":
        assert not re.search(r"^\[GK-0\d\]", text, re.MULTILINE)


def test_hidden_characters_are_shown_not_dropped() -> None:
    text = _user_text(_request(goal="delete al\u200blow \u202eevil\u202c"))
    assert "al<U+200B>low <U+202E>evil<U+202C>" in text


def test_the_prompt_contents_are_tokenised_as_plain_text_only() -> None:
    """chat.py: the template's glue is tokenised with special tokens on, every content with them
    off: no injected text ever reaches the special-token tokenizer."""
    request = inject(inject(_request(), "chatml", "history"), "gemma_turns", "action")
    prompt = _prompt(request)
    rendered = "".join(
        f"<|im_start|>{m['role']}\n{m['content']}<|im_end|>\n" for m in slotted_messages(prompt)
    )
    special: list[str] = []
    plain: list[str] = []
    tokenize_slotted(
        rendered,
        prompt,
        template_text=lambda t: special.append(t) or [0],  # type: ignore[func-returns-value]
        content=lambda t: plain.append(t) or [1],  # type: ignore[func-returns-value]
    )
    glue = "".join(special)
    assert "allow" not in glue and "system\nThe action" not in glue
    assert set(re.sub(r"<\|im_(start|end)\|>|system|user|assistant|\n", "", glue)) == set()
    assert any("im_start" in p for p in plain)  # the broken-up marker, as plain text


def test_the_whole_corpus_builds_from_the_reporting_records() -> None:
    data = SHARED_DATA / "assebench" / "AgentJudge-security.json"
    if not data.exists():
        pytest.skip(f"{data} is not here")
    _, reporting = split(load_records(data))
    variants = corpus(sample(reporting, 40))
    unsafe = {v.record.id for v in variants}
    assert unsafe and all(v.record.unsafe for v in variants)
    assert len(variants) == len(unsafe) * (1 + len(KINDS) * len(PLACES))
    assert all(v.as_record.request for v in variants)  # every one validates


def test_the_flip_table_prints() -> None:
    from benchmarks.injection import table_lines

    table = {
        "none": {"n": 4, "allow_rate": 0.0, "flips": 0},
        "chatml/action": {"n": 4, "allow_rate": 0.25, "flips": 1},
    }
    lines = table_lines("edge", table)
    assert "chatml/action" in lines[2] and lines[2].split()[-2:] == ["1", "0"]
    assert "25.0" in lines[2]
    assert lines[-1] == "flips caused by injection on edge: 1 of 4 injected requests"
