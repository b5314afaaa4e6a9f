"""The backend protocol: load, generate under a constraint, stop when told, close.

Backends know nothing of tiers, budgets or HTTP. They turn engine exceptions into
`BackendError` at their boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol


@dataclass(frozen=True)
class ChatMessage:
    role: Literal["system", "user", "assistant"]
    content: str


@dataclass(frozen=True)
class Prompt:
    """Chat messages, and the start of the answer that the prompt already holds.

    Message content is untrusted: backends must never let it become control tokens."""

    messages: tuple[ChatMessage, ...]
    response_prefix: str = ""


@dataclass(frozen=True)
class Constraint:
    """What the output may be. `gbnf` constrains the text after `prompt.response_prefix`;
    `schema` is the JSON schema of the whole answer (for engines that take one)."""

    schema: dict[str, Any]
    gbnf: str
    # Words that may start the generated text; backends that can read logits report their
    # probabilities at the first position (the decision, read like Llama Guard's P(unsafe)).
    choices: tuple[str, ...] = ()


# Given the probabilities of the constraint's choices at the first position, the choice to
# generate. Backends that read logits force it; others sample and report what they got.
ChoicePolicy = Callable[[dict[str, float]], str]


@dataclass(frozen=True)
class GenerationRequest:
    prompt: Prompt
    constraint: Constraint
    max_tokens: int
    deadline: float  # time.monotonic() value after which generation must stop
    temperature: float = 0.0
    seed: int = 0
    choose: ChoicePolicy | None = None
    repeat_penalty: float = 1.0
    presence_penalty: float = 0.0
    frequency_penalty: float = 0.0


class Finish(StrEnum):
    STOP = "stop"  # the engine ended the output (end of sequence)
    LENGTH = "length"  # max_tokens reached
    DEADLINE = "deadline"  # the monotonic deadline passed
    HOOK = "hook"  # the caller's token hook asked to stop


# Called with (token id, text piece) for every generated token; True stops generation.
TokenHook = Callable[[int, str], bool]


@dataclass
class Generation:
    text: str  # the generated text, without the prompt's response prefix
    finish: Finish
    prompt_tokens: int = 0
    cached_tokens: int = 0  # prompt tokens reused from the KV cache, not evaluated again
    completion_tokens: int = 0
    prefill_s: float = 0.0
    decode_s: float = 0.0
    choice_probs: dict[str, float] = field(default_factory=dict)


class Backend(Protocol):
    """One loaded model behind one engine. Not thread-safe: callers serialise `generate`."""

    engine: str
    model: str

    @property
    def context_size(self) -> int: ...

    def load(self) -> None: ...

    def count_tokens(self, text: str) -> int: ...

    def generate(
        self, request: GenerationRequest, on_token: TokenHook | None = None
    ) -> Generation: ...

    def health(self) -> bool: ...

    def close(self) -> None: ...
