"""The backend protocol: load, generate under a constraint, stop when told, close.

Backends know nothing of tiers, budgets or HTTP. They turn engine exceptions into
`BackendError` at their boundary."""

from __future__ import annotations

from collections.abc import Callable
from dataclasses import dataclass, field
from enum import StrEnum
from typing import Any, Literal, Protocol, runtime_checkable


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
    # requests in flight on the engine (this one included) when it was sent: a remote engine
    # that batches serves each request more slowly the more it serves at once
    concurrency: int = 1


@dataclass
class HiddenStates:
    """The residual stream after chosen layers, read during one prefill (no token generated).

    `last[k]` is layer `layers[k]` at the prompt's last token; `marks[k][j]` the same layer at
    the last token of the j-th marked span (see `HiddenStateReader.hidden_states`);
    `span_mean[k]` the same layer averaged over a span's tokens, when one was asked for."""

    layers: tuple[int, ...]
    last: Any  # numpy array (len(layers), n_embd)
    marks: Any  # numpy array (len(layers), len(marks), n_embd)
    prompt_tokens: int = 0
    cached_tokens: int = 0
    prefill_s: float = 0.0
    choice_probs: dict[str, float] = field(default_factory=dict)
    span_mean: Any = None  # numpy array (len(layers), n_embd), with `span`


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


@runtime_checkable
class HiddenStateReader(Protocol):
    """A backend that can read its model's hidden states during prefill (for trained probes).
    After the call the prompt is in the KV cache, so a `generate` on the same prompt that
    follows starts decoding at once."""

    @property
    def n_layers(self) -> int: ...

    @property
    def model_sha256(self) -> str:
        """The model file's sha256: a probe is refused unless it was trained on this one."""
        ...

    def hidden_states(
        self,
        prompt: Prompt,
        *,
        layers: tuple[int, ...],
        marks: tuple[str, ...] = (),
        choices: tuple[str, ...] = (),
        deadline: float | None = None,
        span: tuple[str, str | None] | None = None,
        until: str | None = None,
        shallow_after: str | None = None,
    ) -> HiddenStates:
        """`until`: evaluate the prompt only through the end of this mark (its last
        occurrence), as if the prompt ended there; a call on the whole prompt that follows
        evaluates only the rest. `shallow_after`: after the end of this mark, run the network
        only up to the deepest layer read, keeping none of those tokens in the KV cache
        (for a read that no generation follows)."""
        ...


@runtime_checkable
class ConcurrentBackend(Protocol):
    """A backend that serves many requests at once from the event loop (a remote engine that
    batches): `agenerate` is `generate` as a coroutine, safe to run concurrently up to
    `capacity`; cancelling it stops the engine's work on that request."""

    @property
    def max_concurrency(self) -> int:
        """Requests in flight per replica; 1 means the serial path (`generate` on a thread)."""
        ...

    @property
    def capacity(self) -> int:
        """Requests the backend takes at once now: max_concurrency per live replica."""
        ...

    @property
    def busy(self) -> bool:
        """Every live replica asked for a pause (429 or 503): the backend is saturated."""
        ...

    def next_concurrency(self) -> int:
        """In flight on the replica that the next request would get, that request included."""
        ...

    async def start(self, on_replica_event: Callable[[str, str], None] | None = None) -> None:
        """On the event loop, after `load`: the async transport and health checks.
        `on_replica_event(url, event)` hears of ejections ("ejected:<reason>"), readmissions
        and pauses ("busy")."""
        ...

    async def agenerate(
        self, request: GenerationRequest, on_token: TokenHook | None = None
    ) -> Generation: ...

    async def aclose(self) -> None: ...
