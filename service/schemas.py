"""The HTTP contract: request, response and error models (pydantic v2 only)."""

from __future__ import annotations

from enum import StrEnum
from typing import Annotated, Any, Literal

from pydantic import BaseModel, ConfigDict, Field, field_validator, model_validator

# Bounds keep one request from exhausting memory or the model's context; the
# prompt builder trims further to fit the tier's context window.
MAX_TEXT = 20_000
MAX_TURNS = 200
MAX_EVIDENCE = 256
ID_PATTERN = r"^[A-Za-z0-9][A-Za-z0-9_.:\-]{0,63}$"
MAX_ARGUMENT_DEPTH = 32  # tool arguments nested deeper break serialisers downstream (audit log)


class Decision(StrEnum):
    ALLOW = "allow"
    DENY = "deny"
    REVISE = "revise"
    ESCALATE = "escalate"


class DegradedReason(StrEnum):
    """Why an answer is degraded; every fail-closed answer carries one."""

    MODEL_UNAVAILABLE = "model_unavailable"
    MODEL_ERROR = "model_error"
    INVALID_OUTPUT = "invalid_output"
    DEADLINE = "deadline"
    DOOM_LOOP = "doom_loop"
    INPUT_TOO_LONG = "input_too_long"
    BUDGET_INFEASIBLE = "budget_infeasible"
    OVERLOADED = "overloaded"
    INTERNAL_ERROR = "internal_error"
    SHUTTING_DOWN = "shutting_down"


class _Strict(BaseModel):
    model_config = ConfigDict(extra="forbid")


class Agent(_Strict):
    id: str = Field(min_length=1, max_length=128, description="The calling agent's id.")
    profile: str = Field(
        default="", max_length=MAX_TEXT, description="The agent's system profile or role."
    )


class Turn(_Strict):
    # the rule of the validator below, stated in the schema too so that clients and contract
    # fuzzers see it (OpenAPI 3.1 is JSON Schema 2020-12, which has if/then)
    model_config = ConfigDict(
        extra="forbid",
        json_schema_extra={
            "if": {"properties": {"role": {"not": {"const": "agent"}}}},
            "then": {"properties": {"thought": {"type": "null"}, "action": {"type": "null"}}},
        },
    )

    role: Literal["user", "agent", "tool", "environment"]
    content: str = Field(default="", max_length=MAX_TEXT)
    thought: str | None = Field(default=None, max_length=MAX_TEXT, description="Agent turns only.")
    action: str | None = Field(default=None, max_length=MAX_TEXT, description="Agent turns only.")

    @model_validator(mode="after")
    def _agent_fields_only_on_agent_turns(self) -> Turn:
        if self.role != "agent" and (self.thought is not None or self.action is not None):
            raise ValueError("only agent turns may carry 'thought' or 'action'")
        return self


def _depth(value: Any) -> int:
    """How many objects and arrays deep a JSON value nests (iteratively: it may be hostile)."""
    deepest, stack = 0, [(value, 1)]
    while stack:
        node, level = stack.pop()
        if isinstance(node, dict | list):
            deepest = max(deepest, level)
            stack += [(v, level + 1) for v in (node.values() if isinstance(node, dict) else node)]
    return deepest


class ToolAction(_Strict):
    tool: str = Field(min_length=1, max_length=256, pattern=r"\S")
    arguments: dict[str, Any] = Field(
        default_factory=dict, description=f"At most {MAX_ARGUMENT_DEPTH} levels deep."
    )

    @field_validator("arguments")
    @classmethod
    def _bounded_depth(cls, arguments: dict[str, Any]) -> dict[str, Any]:
        if _depth(arguments) > MAX_ARGUMENT_DEPTH:
            raise ValueError(f"arguments nest deeper than {MAX_ARGUMENT_DEPTH} levels")
        return arguments


class TextAction(_Strict):
    text: str = Field(min_length=1, max_length=MAX_TEXT, pattern=r"\S")


ProposedAction = ToolAction | TextAction


class TripleEvidence(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    subject: str = Field(min_length=1, max_length=1000)
    predicate: str = Field(min_length=1, max_length=1000)
    object: str = Field(min_length=1, max_length=1000)
    source: str | None = Field(default=None, max_length=1000)


class RuleEvidence(_Strict):
    id: str = Field(pattern=ID_PATTERN)
    text: str = Field(min_length=1, max_length=4000)
    source: str | None = Field(default=None, max_length=1000)


EvidenceItem = TripleEvidence | RuleEvidence


class EvaluateRequest(_Strict):
    request_id: str | None = Field(
        default=None, pattern=ID_PATTERN, description="Made by the server when missing."
    )
    agent: Agent
    goal: str = Field(default="", max_length=MAX_TEXT, description="The user's instruction.")
    history: list[Turn] = Field(default_factory=list, max_length=MAX_TURNS)
    action: ProposedAction = Field(description="The proposed next action.")
    evidence: list[EvidenceItem] | None = Field(default=None, max_length=MAX_EVIDENCE)
    policy: str | None = Field(
        default=None, max_length=64, description="Name of a server-side policy pack."
    )
    latency_budget_ms: int | None = Field(
        default=None, ge=1, le=600_000, description="Server default when missing."
    )
    tier: str | None = Field(
        default=None, min_length=1, max_length=32, description="Pin a tier by name."
    )
    explain: bool = Field(default=True, description="Ask for a rationale and citations.")
    revise: bool | None = Field(
        default=None,
        description="After an unsafe verdict, offer a safer action of the same shape (a "
        "call of the same tool with a subset of its arguments, or bounded text), offered only "
        "when the same judge allows it. None: the tier's default (on for edge and mid).",
    )

    @field_validator("evidence")
    @classmethod
    def _unique_evidence_ids(cls, items: list[EvidenceItem] | None) -> list[EvidenceItem] | None:
        if items:
            seen: set[str] = set()
            for item in items:
                if item.id in seen:
                    raise ValueError(f"duplicate evidence id {item.id!r}")
                seen.add(item.id)
        return items


class Timing(BaseModel):
    queue_ms: float = 0.0
    prefill_ms: float = 0.0
    decode_ms: float = 0.0
    total_ms: float = 0.0
    revise_ms: float = Field(
        default=0.0,
        description="The revision step (its generation and the judge's read), within total.",
    )


class Usage(BaseModel):
    prompt_tokens: int = 0
    completion_tokens: int = 0


class Trimmed(BaseModel):
    """What the prompt builder left out to fit the model's context."""

    history_turns: int = 0
    evidence_items: int = 0


LoopAction = Literal["retry", "other_tier", "fail_closed"]


class LoopReport(BaseModel):
    """A doom loop the detector stopped, and what was done about it."""

    tier: str
    kind: str = Field(description="periodic_tokens, repeated_chunk, whitespace_run, ...")
    at_token: int = Field(description="Output token at which the loop was detected.")
    detail: str
    action: LoopAction


class RouteInfo(BaseModel):
    """How the tier was chosen."""

    kind: Literal["fits", "pinned", "routed_down", "shrunk", "infeasible", "overloaded"]
    predicted_ms: float | None = Field(
        default=None, description="Predicted latency on the chosen tier (high percentile)."
    )
    escalated_from: str | None = Field(
        default=None, description="The tier whose low-confidence answer was re-asked."
    )


InjectionKind = Literal[
    "template_marker",
    "forged_answer",
    "decision_directive",
    "instruction_override",
    "forged_section",
    "role_header",
]


class InjectionSignal(BaseModel):
    place: str = Field(
        description="Where: 'action', 'goal', 'profile', 'history[N]' (1-based) or 'evidence[ID]'."
    )
    kind: InjectionKind
    excerpt: str = Field(description="The folded text around the match, at most 80 characters.")


class EvaluateResponse(BaseModel):
    request_id: str
    decision: Decision
    confidence: Annotated[float, Field(ge=0.0, le=1.0)]
    evidence: list[EvidenceItem] = Field(default_factory=list)
    cited_history: list[int] = Field(
        default_factory=list, description="1-based indices of the history turns cited."
    )
    rationale: str = ""
    revision: ProposedAction | None = Field(
        default=None,
        description="Present exactly when the decision is 'revise': a safer action of the "
        "proposed action's shape that the same judge, reading it in the same context, allows.",
    )
    revision_rejected: bool = Field(
        default=False,
        description="A revision was generated after an unsafe verdict but not offered (the "
        "judge would not allow it, or it looped, broke its shape or could not be read in "
        "time): the decision is the original one.",
    )
    tier: str | None = None
    model: str | None = None
    degraded: bool = False
    reason: DegradedReason | None = None
    trimmed: Trimmed | None = None
    route: RouteInfo | None = None
    loops: list[LoopReport] = Field(
        default_factory=list, description="Loops detected while answering, and the recovery."
    )
    timing: Timing = Field(default_factory=Timing)
    usage: Usage = Field(default_factory=Usage)
    decided_by: Literal["generation", "probe", "none"] = Field(
        default="generation",
        description="What produced the decision: the model's constrained generation (the "
        "decision read from its logits), a trained probe on its hidden states (the rationale, "
        "if any, generated afterwards), or nothing (a fail-closed answer).",
    )
    injection: list[InjectionSignal] = Field(
        default_factory=list,
        description="Text in the request aimed at the judge rather than the agent's world "
        "(chat-template markers, forged answers, directives about the decision, system or "
        "judge headers). When any is found the decision is never allow or revise: those "
        "become escalate.",
    )


class ErrorBody(BaseModel):
    message: str
    type: str
    code: str
    param: str | None = None


class ErrorResponse(BaseModel):
    error: ErrorBody


class TierStatus(BaseModel):
    name: str
    state: Literal["loaded", "loading", "unavailable", "failed"]
    model: str | None = None
    detail: str | None = None


class HealthResponse(BaseModel):
    status: Literal["ok"]


class ReadyResponse(BaseModel):
    ready: bool
    tiers: list[TierStatus]
