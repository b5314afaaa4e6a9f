"""An OpenAI-compatible serving engine over HTTP: vLLM, the llama.cpp server, Ollama,
llama-cpp-python's server. The engine enforces the request's JSON schema (`response_format`);
the answer streams back over SSE so that the token hook (loop detector, completeness check)
and the deadline act on it as they do on a local model.

Synchronous on purpose: `generate` already runs on the tier's own worker thread, so a pooled
`httpx.Client` costs no event-loop time, and closing the stream stops the engine's work."""

from __future__ import annotations

import json
import logging
import math
import re
import threading
import time
import zlib
from collections.abc import Iterator
from typing import Any

import httpx

from service.backends.base import Finish, Generation, GenerationRequest, TokenHook
from service.errors import BackendError

logger = logging.getLogger(__name__)

# The opening that the local backends put in the prompt (`Prompt.response_prefix`). A chat
# engine writes it itself, with its own spacing; `Generation.text` starts after it.
_OPENING = re.compile(r'\s*\{\s*"decision"\s*:\s*"')
_OPENING_MAX = 64  # characters; an engine that writes something else is not waited on longer
_RETRY_STATUS = frozenset({502, 503, 504})  # a proxy or an engine that is still starting
_BACKOFF_S = 0.05
# Chat engines take no tokenizer call that all of them share; a conservative estimate keeps
# prompts inside the context (English runs ~4 characters per token in these tokenizers).
_CHARS_PER_TOKEN = 3.0


class _Retryable(Exception):
    """The engine could not be reached, or said it is unavailable, before any token."""


class _Stream:
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
            elif len(self.raw) >= _OPENING_MAX or not _could_open(self.raw):
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


def _could_open(text: str) -> bool:
    """True while `text` is still a prefix of some opening."""
    stripped = re.sub(r"\s+", "", text)
    return '{"decision":"'.startswith(stripped)


class OpenAICompatibleBackend:
    engine = "openai"

    def __init__(
        self,
        model: str,
        base_url: str,
        *,
        api_key: str | None = None,
        context_size: int = 4096,
        connect_timeout_s: float = 2.0,
        max_retries: int = 2,
        response_format: str = "json_schema",
        top_logprobs: int = 0,
        max_connections: int = 8,
    ) -> None:
        self.model = model
        self._base_url = base_url.rstrip("/")
        self._api_key = api_key
        self._context_size = context_size
        self._connect_timeout_s = connect_timeout_s
        self._max_retries = max_retries
        self._response_format = response_format
        self._top_logprobs = top_logprobs
        self._limits = httpx.Limits(max_connections=max_connections)
        self._client: httpx.Client | None = None

    @property
    def context_size(self) -> int:
        return self._context_size

    def load(self) -> None:
        headers = {"authorization": f"Bearer {self._api_key}"} if self._api_key else {}
        self._client = httpx.Client(
            base_url=self._base_url,
            headers=headers,
            limits=self._limits,
        )
        try:
            response = self._client.get("/models", timeout=self._connect_timeout_s + 3.0)
        except httpx.HTTPError as exc:
            self.close()
            raise BackendError(f"cannot reach the engine at {self._base_url}: {exc!r}") from exc
        if response.status_code >= 400:
            self.close()
            raise BackendError(
                f"the engine at {self._base_url} answered {response.status_code} to /models"
            )
        logger.info("serving %s from the engine at %s", self.model, self._base_url)

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / _CHARS_PER_TOKEN)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        body: dict[str, Any] = {
            "model": self.model,
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
        if self._response_format == "json_object":  # llama-cpp-python's form
            body["response_format"] = {"type": "json_object", "schema": schema}
        else:
            body["response_format"] = {
                "type": "json_schema",
                "json_schema": {"name": "gatekeeper_answer", "strict": True, "schema": schema},
            }
        if request.repeat_penalty != 1.0:
            body["repeat_penalty"] = request.repeat_penalty  # llama.cpp and vLLM extension
        if self._top_logprobs and request.constraint.choices:
            body["logprobs"] = True
            body["top_logprobs"] = self._top_logprobs
        return body

    def _timeout(self, deadline: float) -> httpx.Timeout:
        left = max(deadline - time.monotonic(), 0.001)
        return httpx.Timeout(left, connect=min(self._connect_timeout_s, left))

    def generate(self, request: GenerationRequest, on_token: TokenHook | None = None) -> Generation:
        client = self._client
        if client is None:
            raise BackendError(f"model {self.model} is not loaded")
        body = self._body(request)
        attempt = 0
        while True:
            start = time.monotonic()
            try:
                return self._stream(client, body, request, on_token, start)
            except _Retryable as exc:
                attempt += 1
                pause = _BACKOFF_S * 2 ** (attempt - 1)
                if attempt > self._max_retries or time.monotonic() + pause >= request.deadline:
                    raise BackendError(f"engine unavailable: {exc}") from exc
                logger.warning("engine unavailable (%s); retry %d", exc, attempt)
                time.sleep(pause)

    def _stream(
        self,
        client: httpx.Client,
        body: dict[str, Any],
        request: GenerationRequest,
        on_token: TokenHook | None,
        start: float,
    ) -> Generation:
        if time.monotonic() >= request.deadline:
            return Generation(text="", finish=Finish.DEADLINE)
        state = _Stream(on_token, request.constraint.choices)
        first_at: float | None = None
        try:
            with client.stream(
                "POST", "/chat/completions", json=body, timeout=self._timeout(request.deadline)
            ) as response:
                if response.status_code >= 400:
                    detail = response.read().decode("utf-8", "replace")[:300]
                    message = f"engine answered {response.status_code}: {detail}"
                    if response.status_code in _RETRY_STATUS:
                        raise _Retryable(message)
                    raise BackendError(message)
                # A stalled engine must not hold the tier past the deadline: the read timeout
                # was fixed when the request left, so a watchdog closes the stream at the
                # deadline whatever the socket is doing.
                watchdog = threading.Timer(
                    max(request.deadline - time.monotonic(), 0.0), response.close
                )
                watchdog.daemon = True
                watchdog.start()
                try:
                    for event in _events(response):
                        if first_at is None and _has_content(event):
                            first_at = time.monotonic()
                        if self._take(event, state):
                            state.finish = Finish.HOOK
                            break
                        if time.monotonic() >= request.deadline:
                            state.finish = Finish.DEADLINE
                            break
                        if state.count >= request.max_tokens and state.finish is None:
                            state.finish = Finish.LENGTH
                            break
                finally:
                    watchdog.cancel()
        except httpx.HTTPError as exc:
            # Past the deadline, whatever broke the stream was the watchdog closing it.
            if time.monotonic() >= request.deadline:
                state.finish = Finish.DEADLINE
            elif isinstance(exc, httpx.TransportError) and state.count == 0:
                raise _Retryable(repr(exc)) from exc  # nothing was generated: safe to resend
            else:
                raise BackendError(f"the engine went away mid-answer: {exc!r}") from exc
        end = time.monotonic()
        first = first_at or end
        usage = state.usage
        details = usage.get("prompt_tokens_details") or {}
        prompt_tokens = int(usage.get("prompt_tokens") or 0) or sum(
            self.count_tokens(m["content"]) for m in body["messages"]
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
        )

    @staticmethod
    def _take(event: dict[str, Any], state: _Stream) -> bool:
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

    def health(self) -> bool:
        return self._client is not None

    def close(self) -> None:
        if self._client is not None:
            self._client.close()
            self._client = None


def _has_content(event: dict[str, Any]) -> bool:
    return any((c.get("delta") or {}).get("content") for c in event.get("choices") or [])


def _events(response: httpx.Response) -> Iterator[dict[str, Any]]:
    """Server-sent events of a streamed chat completion, as JSON objects."""
    for line in response.iter_lines():
        if not line or line.startswith(":"):
            continue  # keep-alive comments and event separators
        if not line.startswith("data:"):
            continue  # `event:` / `id:` fields carry nothing we use
        data = line[5:].strip()
        if data == "[DONE]":
            return
        try:
            event = json.loads(data)
        except ValueError as exc:
            raise BackendError(f"invalid event from the engine: {data[:120]!r}") from exc
        if not isinstance(event, dict):
            raise BackendError(f"invalid event from the engine: {data[:120]!r}")
        if "error" in event:
            raise BackendError(f"the engine reported an error: {str(event['error'])[:300]}")
        yield event
