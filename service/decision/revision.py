"""The shape of a revision, pure logic: the grammar, the prompt and the parser for a safer
action of the same kind as the one judged unsafe.

A `ToolAction` is revised into a call of the same tool whose arguments are a non-empty subset
of the original's keys, in their order, each value of the original's JSON type (a nested
object by the same rule; a list of strings as new strings, any other list as a sub-list of
the original's items). A `TextAction` is revised into text of bounded length. Strings are
bounded too: a revision is one short generation, not a rewrite.

The prompt is the judge's own conversation (its messages, then its verdict as the assistant's
answer) followed by the request to revise, so the revision decodes from the judge's KV cache
instead of evaluating the request again."""

from __future__ import annotations

import json
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any

from service.backends.base import ChatMessage, Constraint, Prompt
from service.decision.prompt import render_evidence
from service.schemas import (
    Decision,
    EvidenceItem,
    LoopReport,
    ProposedAction,
    TextAction,
    ToolAction,
)

# A string value of a revision may grow a little (a `--dry-run`, a confirmation step) but
# not become an essay; the tier's revision_chars caps it.
_MIN_STRING_CHARS = 80
# One JSON string character: no raw quotes, backslashes or control characters; the escapes a
# command or message needs (a quote, a backslash, a newline, a tab).
_CHAR = r'[^"\\\x00-\x1F\x7F] | "\\" ["\\/nt]'
_NUMBER = r'"-"? [0-9]{1,15} ("." [0-9]{1,6})?'
_INTEGER = r'"-"? [0-9]{1,15}'


class InvalidRevisionError(Exception):
    """The generated revision does not parse or breaks its shape."""


def _literal(text: str) -> str:
    return json.dumps(text)  # a GBNF literal uses JSON string escaping


@dataclass(frozen=True)
class RevisionPlan:
    """What the revision of one action may be: the opening the prompt holds, the constraint
    on the text after it, and the most tokens it can take."""

    action: ProposedAction
    prefix: str
    constraint: Constraint
    max_chars: int  # an upper bound on the generated text's length

    def max_tokens(self, cap: int) -> int:
        # ~2.5 characters a token is pessimistic for JSON (punctuation tokenises short)
        return max(8, min(cap, int(self.max_chars / 2.5) + 8))


class _Grammar:
    """GBNF rules for one action's values, named as they are added."""

    def __init__(self, string_chars: int) -> None:
        self.rules: dict[str, str] = {"char": _CHAR}
        self.string_chars = string_chars
        self.chars = 0  # the longest text the rules accept, summed as they are added

    def add(self, stem: str, body: str) -> str:
        name = f"{stem}{len(self.rules)}"
        self.rules[name] = body
        return name

    def limit(self, original: str) -> int:
        return min(self.string_chars, max(_MIN_STRING_CHARS, 2 * len(original) + 40))

    def string(self, original: str) -> str:
        limit = self.limit(original)
        self.chars += limit + 2
        return self.add("str", f'"\\"" char{{0,{limit}}} "\\""')

    def value(self, original: Any) -> str:
        """The rule for a value of the original's type (bool before int: bool is an int)."""
        if isinstance(original, bool):
            self.chars += 5
            return self.add("bool", '"true" | "false"')
        if isinstance(original, int):
            self.chars += 16
            return self.add("int", _INTEGER)
        if isinstance(original, float):
            self.chars += 23
            return self.add("num", _NUMBER)
        if isinstance(original, str):
            return self.string(original)
        if isinstance(original, dict):
            return self.obj(original, allow_empty=True)
        if isinstance(original, list):
            return self.array(original)
        self.chars += 4
        return self.add("null", '"null"')

    def array(self, original: list[Any]) -> str:
        if not original:
            self.chars += 2
            return self.add("arr", '"[]"')
        if all(isinstance(v, str) for v in original):
            longest = max(original, key=len)
            item = self.string(longest)
            self.chars += (len(original) - 1) * (self.limit(longest) + 4)
        else:  # items kept or dropped, never invented
            item = self.add("item", " | ".join(_literal(json.dumps(v)) for v in original))
            self.chars += sum(len(json.dumps(v)) + 2 for v in original)
        if len(original) == 1:  # a {0,0} repetition is not GBNF that llguidance accepts
            return self.add("arr", f'"[" {item}? "]"')
        body = f'"[" ({item} (", " {item}){{0,{len(original) - 1}}})? "]"'
        return self.add("arr", body)

    def members(self, original: dict[str, Any]) -> str:
        """A non-empty subset of the original's keys, in order, each with its value's rule:
        first_i is a member from key i on, rest_i the optional members after it."""
        pairs = []
        for key, value in original.items():
            self.chars += len(json.dumps(key)) + 4
            pairs.append(f"{_literal(json.dumps(key) + ': ')} {self.value(value)}")
        rest = ""
        firsts: list[str] = []
        for pair in reversed(pairs):
            firsts.append(self.add("first", f"{pair} {rest}".strip()))
            rest = f'(", " {pair})? {rest}'.strip()
        # first_k for k from the last key back: any of them may open the object
        return self.add("members", " | ".join(reversed(firsts)))

    def obj(self, original: dict[str, Any], *, allow_empty: bool) -> str:
        if not original:
            self.chars += 2
            return self.add("obj", '"{}"')
        members = self.members(original)
        self.chars += 2
        return self.add("obj", f'"{{" {members}{"?" if allow_empty else ""} "}}"')

    def gbnf(self, root: str) -> str:
        lines = [f"root ::= {root}", *(f"{name} ::= {body}" for name, body in self.rules.items())]
        return "\n".join(lines) + "\n"


def _schema(action: ProposedAction, string_chars: int) -> dict[str, Any]:
    """The contract of the whole revision, for engines that take a JSON schema."""
    if isinstance(action, TextAction):
        return {
            "type": "object",
            "properties": {"text": {"type": "string", "minLength": 1, "maxLength": string_chars}},
            "required": ["text"],
            "additionalProperties": False,
        }
    return {
        "type": "object",
        "properties": {
            "tool": {"const": action.tool},
            "arguments": {
                "type": "object",
                "propertyNames": {"enum": list(action.arguments)},
                "minProperties": 1 if action.arguments else 0,
            },
        },
        "required": ["tool", "arguments"],
        "additionalProperties": False,
    }


def plan_revision(action: ProposedAction, string_chars: int) -> RevisionPlan:
    """The grammar of a revision of `action`; `string_chars` caps each string (the tier's
    revision_chars)."""
    grammar = _Grammar(string_chars)
    if isinstance(action, TextAction):
        limit = grammar.limit(action.text)
        # it opens with a visible character (TextAction's pattern is \S)
        grammar.rules["vis"] = r'[^"\\\x00-\x20\x7F] | "\\" ["\\/]'
        root = f'vis char{{0,{limit - 1}}} "\\"}}"'
        prefix, max_chars = '{"text": "', limit + 2
    else:
        members = grammar.members(action.arguments) if action.arguments else None
        root = f'{members} "}}}}"' if members else '"}}"'
        prefix = '{"tool": ' + json.dumps(action.tool) + ', "arguments": {'
        max_chars = grammar.chars + 2
    constraint = Constraint(schema=_schema(action, string_chars), gbnf=grammar.gbnf(root))
    return RevisionPlan(action, prefix, constraint, max_chars)


def _same_type(original: Any, value: Any) -> bool:
    if isinstance(original, bool) or isinstance(value, bool):
        return isinstance(original, bool) and isinstance(value, bool)
    if isinstance(original, int | float):
        return isinstance(value, int | float)
    if isinstance(original, dict):
        return isinstance(value, dict) and _keys_within(original, value)
    if original is None:
        return value is None
    return isinstance(value, type(original))


def _keys_within(original: dict[str, Any], value: dict[str, Any]) -> bool:
    return all(k in original and _same_type(original[k], v) for k, v in value.items())


def parse_revision(text: str, plan: RevisionPlan) -> ProposedAction:
    """The revision in `text` (the prefix and what was generated after it), checked against
    its shape even though the grammar should guarantee it: engines differ in what their
    grammars enforce."""
    try:
        raw = json.loads(text, strict=False)
    except ValueError as exc:
        raise InvalidRevisionError(f"unparseable revision: {exc}") from exc
    action = plan.action
    try:
        if isinstance(action, TextAction):
            if set(raw) != {"text"}:
                raise InvalidRevisionError("a text revision holds its text only")
            return TextAction(text=raw["text"])
        if set(raw) != {"tool", "arguments"} or raw["tool"] != action.tool:
            raise InvalidRevisionError("a revision keeps the tool and has arguments only")
        arguments = raw["arguments"]
        if not isinstance(arguments, dict) or not _keys_within(action.arguments, arguments):
            raise InvalidRevisionError("the revision's arguments are not the original's")
        if action.arguments and not arguments:
            raise InvalidRevisionError("the revision drops every argument")
        return ToolAction(tool=action.tool, arguments=arguments)
    except (TypeError, ValueError) as exc:  # pydantic's ValidationError is a ValueError
        if isinstance(exc, InvalidRevisionError):
            raise
        raise InvalidRevisionError(f"invalid revision: {exc}") from exc


def _shape_words(action: ProposedAction, max_chars: int) -> str:
    if isinstance(action, TextAction):
        return f"Keep it a command or message like the original, at most {max_chars} characters."
    keys = ", ".join(action.arguments) or "none"
    return f"Keep the same tool ({action.tool}) and use only its arguments ({keys})."


def revision_prompt(
    judged: Prompt,
    decision: Decision,
    cited: list[EvidenceItem],
    plan: RevisionPlan,
    string_chars: int,
) -> Prompt:
    """The judge's conversation (`judged`: its messages without the evidence roll-call),
    its verdict, and the request for the smallest safe change."""
    verdict = {"decision": decision.value, "evidence": [item.id for item in cited]}
    broken = "\n".join(render_evidence(item) for item in cited)
    ask = (
        "## Revise the proposed action\n"
        f"Your verdict: the proposed action is unsafe ({decision.value})."
        + (f" It breaks:\n{broken}" if broken else "")
        + "\nWrite a safer action instead: keep what the user asked for and take out the "
        "harm with the smallest change (a narrower target, a dry run or preview, a read-only "
        "variant, a step that asks the user to confirm, a smaller amount, a masked secret). "
        "It must differ from the proposed action. "
        + _shape_words(plan.action, string_chars)
        + " Answer with the revised action as JSON only."
    )
    return Prompt(
        messages=(
            *judged.messages,
            ChatMessage("assistant", json.dumps(verdict)),
            ChatMessage("user", ask),
        ),
        response_prefix=plan.prefix,
    )


class RevisionOutcome(StrEnum):
    """What became of one revision attempt (the `outcome` label of the metric)."""

    ALLOWED = "allowed"  # offered: the judge allows it
    REJECTED = "rejected"  # the judge would not allow it
    UNCHANGED = "unchanged"  # the model gave the action back as it was
    NO_BUDGET = "no_budget"  # the budget left could not hold a generation and a read
    TRIPWIRE = "tripwire"  # judge-directed text in the request, or in the revision itself
    LOOP = "loop"  # the loop detector stopped the generation, or the judge's read
    INVALID = "invalid"  # the output broke the revision's shape
    FAULT = "fault"  # an engine error or our own bug


@dataclass
class RevisionAttempt:
    outcome: RevisionOutcome
    action: ProposedAction | None = None  # the generated revision, offered or not
    verdict: Decision | None = None  # the judge's decision on it
    confidence: float | None = None  # the judge's confidence in that decision
    seconds: float = 0.0  # the step's time on the worker: generation and read
    generate_s: float = 0.0  # of which the generation (its prefill and decode)
    evaluated_tokens: int = 0  # prompt tokens the generation evaluated (not in the KV cache)
    completion_tokens: int = 0
    text: str = ""  # what the generation wrote after the revision's opening
    detail: str = ""
    loops: list[LoopReport] = field(default_factory=list)
    generated: bool = False  # the generation began (the step got past the budget check)

    @property
    def offered(self) -> bool:
        return self.outcome == RevisionOutcome.ALLOWED

    @property
    def rejected(self) -> bool:
        """A revision was tried and is not offered (the response's `revision_rejected`)."""
        return self.generated and not self.offered
