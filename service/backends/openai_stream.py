"""The wire format of an OpenAI-compatible chat engine: the request body, and the stream
that answers it (server-sent events). The pieces after the answer's opening go to the token
hook, the decision's probabilities are read from the log-probabilities, and the stream stops at
the hook, the deadline or max_tokens. Pure logic, shared by the synchronous and the
asynchronous transport of `service/backends/openai.py`."""

from __future__ import annotations

import json
import math
import re
import time
import zlib
from typing import Any

from service.backends.base import Finish, Generation, GenerationRequest, TokenHook
from service.errors import BackendError

# The opening that the local backends put in the prompt (`Prompt.response_prefix`). A chat
# engine writes it itself, with its own spacing; `Generation.text` starts after it.
_OPENING = re.compile(r'\s*\{\s*"decision"\s*:\s*"')
_OPENING_MAX = 64  # characters; an engine that writes something else is not waited on longer
# Chat engines take no tokenizer call that all of them share; a conservative estimate keeps
# prompts inside the context (English runs ~4 characters per token in these tokenizers).
CHARS_PER_TOKEN = 3.0


def chat_body(
    model: str, request: GenerationRequest, response_format: str, top_logprobs: int
) -> dict[str, Any]:
    """The chat-completions request: streamed, the constraint as `response_format` (the
    OpenAI `json_schema` form, or llama-cpp-python's `json_object` with a schema)."""
    body: dict[str, Any] = {
        "model": model,
        "messages": [{"role": m.role, "content": m.content} for m in request.prompt.messages],
        "max_tokens": request.max_tokens,
        "temperature": request.temperature,
        "seed": request.seed,
        "presence_penalty": request.presence_penalty,
        "frequency_penalty": request.frequency_penalty,
        "stream": True,
        "stream_options": {"include_usage": True},
    }
    schema = request.constraint.schema
    if response_format == "json_object":  # llama-cpp-python's form
        body["response_format"] = {"type": "json_object", "schema": schema}
    else:
        body["response_format"] = {
            "type": "json_schema",
            "json_schema": {"name": "gatekeeper_answer", "strict": True, "schema": schema},
        }
    if request.repeat_penalty != 1.0:
        body["repeat_penalty"] = request.repeat_penalty  # llama.cpp and vLLM extension
    if top_logprobs and request.constraint.choices:
        body["logprobs"] = True
        body["top_logprobs"] = top_logprobs
    return body


class StreamState:
    """The state of one streamed answer: the raw text, the part after the opening, the
    decision's probabilities when the engine sent log-probabilities."""

    def __init__(self, on_token: TokenHook | None, choices: tuple[str, ...]) -> None:
        self.raw = ""
        self.text = ""
        self.opened: bool | None = None  # None: not yet known
        self.count = 0
        self.finish: Finish | None = None
        self.usage: dict[str, Any] = {}
        self.choice_probs: dict[str, float] = {}
        self._choices_due = False
        self._on_token = on_token
        self._choices = choices

    def piece(self, piece: str, logprobs: list[dict[str, Any]]) -> bool:
        """Take one streamed piece; True asks to stop."""
        self.count += 1
        start = len(self.raw)
        self.raw += piece
        if self.opened is None:
            match = _OPENING.match(self.raw)
            if match is not None:
                self.opened = True
                # the decision starts in this piece, or in the next one
                self._choices_due = not self._read_choices(logprobs, match.end() - start)
                piece = self.raw[match.end() :]
            elif len(self.raw) >= _OPENING_MAX or not could_open(self.raw):
                self.opened = False  # another key order or shape: verified at the end
                piece = self.raw
            else:
                return False
        elif self._choices_due:
            self._choices_due = False
            self._read_choices(logprobs, 0)
        self.text += piece
        if self._on_token is None or not piece:
            return False
        # ids stand for the text, as with a real tokenizer: equal pieces, equal ids
        return self._on_token(zlib.crc32(piece.encode()), piece)

    def _read_choices(self, logprobs: list[dict[str, Any]], offset: int) -> bool:
        """P(choice) from the top log-probabilities of the token at `offset` characters into
        this piece, where the decision starts; False when the piece ends before it."""
        if not self._choices:
            return True
        for entry in logprobs:
            token = str(entry.get("token", ""))
            if offset < len(token):
                lead = token[:offset]  # the part of this token that closes the opening
                tops = entry.get("top_logprobs") or []
                for top in tops:
                    cand = str(top.get("token", ""))
                    if not cand.startswith(lead) or len(cand) == len(lead):
                        continue
                    rest = cand[len(lead) :]
                    for word in self._choices:
                        if word.startswith(rest):
                            p = math.exp(float(top.get("logprob", -math.inf)))
                            self.choice_probs[word] = self.choice_probs.get(word, 0.0) + p
                if tops:
                    # A word missing from the top-k is at most as likely as the last listed
                    # token: taking that bound keeps P(allow) from being overstated by a
                    # normalisation over the few words that happened to be listed.
                    floor = min(math.exp(float(t.get("logprob", -math.inf))) for t in tops)
                    for word in self._choices:
                        self.choice_probs.setdefault(word, floor)
                return True
            offset -= len(token)
        return False

    def answer(self) -> str:
        """The text after the opening, in the shape the verifier expects."""
        if self.opened:
            return self.text
        try:  # an engine that wrote the keys in another order: put the decision first
            value = json.loads(self.raw, strict=False)
        except ValueError:
            return self.raw
        if not isinstance(value, dict) or not isinstance(value.get("decision"), str):
            return self.raw
        text = json.dumps({"decision": value.pop("decision"), **value})
        return text[len('{"decision": "') :]


def could_open(text: str) -> bool:
    """True while `text` is still a prefix of some opening."""
    stripped = re.sub(r"\s+", "", text)
    return '{"decision":"'.startswith(stripped)


class StreamReader:
    """One streamed answer, fed line by line; `line` returns True when reading should stop."""

    def __init__(self, request: GenerationRequest, on_token: TokenHook | None) -> None:
        self.request = request
        self.state = StreamState(on_token, request.constraint.choices)
        self.first_at: float | None = None
        self.done = False  # the engine sent [DONE]

    def line(self, line: str) -> bool:
        event = parse_event(line)
        if event is None:
            return False
        if event is DONE:
            self.done = True
            return True
        assert isinstance(event, dict)
        state = self.state
        if self.first_at is None and _has_content(event):
            self.first_at = time.monotonic()
        if _take(event, state):
            state.finish = Finish.HOOK
            return True
        if time.monotonic() >= self.request.deadline:
            state.finish = Finish.DEADLINE
            return True
        if state.count >= self.request.max_tokens and state.finish is None:
            state.finish = Finish.LENGTH
            return True
        return False

    @property
    def cut_short(self) -> bool:
        """The stream ended with no finish reason, not because the reader stopped it, and
        what came is not a whole JSON value: the engine dropped the answer part-way
        (llama-cpp-python's server does this to a stream when any other request reaches it,
        unless it runs with `--interrupt_requests False`)."""
        if self.state.finish is not None:
            return False
        try:
            json.loads(self.state.raw, strict=False)
        except ValueError:
            return True
        return False

    def generation(self, body: dict[str, Any], start: float, *, concurrency: int = 1) -> Generation:
        """The answer as the backends report it; `start` is when the request left."""
        end = time.monotonic()
        first = self.first_at or end
        state = self.state
        usage = state.usage
        details = usage.get("prompt_tokens_details") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0) or sum(
            math.ceil(len(m["content"]) / CHARS_PER_TOKEN) for m in body["messages"]
        )
        return Generation(
            text=state.answer(),
            finish=state.finish or Finish.STOP,
            prompt_tokens=prompt_tokens,
            cached_tokens=int(details.get("cached_tokens") or 0),
            completion_tokens=int(usage.get("completion_tokens") or state.count),
            prefill_s=first - start,
            decode_s=end - first,
            choice_probs=state.choice_probs,
            concurrency=concurrency,
        )


DONE = object()  # the stream's `data: [DONE]`


def parse_event(line: str) -> dict[str, Any] | object | None:
    """One SSE line: an event (a JSON object), DONE, or None for lines that carry nothing."""
    if not line or line.startswith(":"):
        return None  # keep-alive comments and event separators
    if not line.startswith("data:"):
        return None  # `event:` / `id:` fields carry nothing we use
    data = line[5:].strip()
    if data == "[DONE]":
        return DONE
    try:
        event = json.loads(data)
    except ValueError as exc:
        raise BackendError(f"invalid event from the engine: {data[:120]!r}") from exc
    if not isinstance(event, dict):
        raise BackendError(f"invalid event from the engine: {data[:120]!r}")
    if "error" in event:
        raise BackendError(f"the engine reported an error: {str(event['error'])[:300]}")
    return event


def _has_content(event: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in event.get("choices") or [])


def _take(event: dict[str, Any], state: StreamState) -> bool:
    if event.get("usage"):
        state.usage = event["usage"]
    for choice in event.get("choices") or []:
        delta = choice.get("delta") or {}
        piece = delta.get("content")
        if piece:
            logprobs = (choice.get("logprobs") or {}).get("content") or []
            if state.piece(str(piece), logprobs):
                return True
        reason = choice.get("finish_reason")
        if reason:
            state.finish = Finish.LENGTH if reason == "length" else Finish.STOP
    return False
