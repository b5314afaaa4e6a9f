"""A scripted backend for fast tests: it plays back outputs token by token, with delays and
failures the test controls. It is never used to serve real decisions."""

from __future__ import annotations

import time
import zlib
from collections.abc import Iterable
from dataclasses import dataclass, field

from service.backends.base import Finish, Generation, GenerationRequest, TokenHook
from service.errors import BackendError


@dataclass
class Script:
    """One scripted answer: generated text (after the response prefix), or an error."""

    text: str = ""
    error: str | None = None
    prefill_delay_s: float = 0.0
    token_delay_s: float = 0.0
    choice_probs: dict[str, float] = field(default_factory=dict)


class FakeBackend:
    engine = "fake"

    def __init__(
        self,
        model: str = "fake-model",
        scripts: Iterable[Script] = (),
        *,
        context_size: int = 4096,
        load_error: str | None = None,
        load_delay_s: float = 0.0,
    ) -> None:
        self.model = model
        self.scripts = list(scripts)
        self.requests: list[GenerationRequest] = []
        self._context_size = context_size
        self._load_error = load_error
        self._load_delay_s = load_delay_s
        self.loaded = False

    @property
    def context_size(self) -> int:
        return self._context_size

    def load(self) -> None:
        time.sleep(self._load_delay_s)
        if self._load_error:
            raise BackendError(self._load_error)
        self.loaded = True

    def count_tokens(self, text: str) -> int:
        return max(1, len(text) // 4)

    def _next_script(self) -> Script:
        if not self.scripts:
            raise BackendError("fake backend has no scripted answer left")
        return self.scripts.pop(0) if len(self.scripts) > 1 else self.scripts[0]

    def generate(self, request: GenerationRequest, on_token: TokenHook | None = None) -> Generation:
        self.requests.append(request)
        script = self._next_script()
        start = time.monotonic()
        time.sleep(script.prefill_delay_s)
        if script.error:
            raise BackendError(script.error)
        prefill = time.monotonic() - start
        text = script.text
        if script.choice_probs and request.choose is not None and '"' in text:
            # like a real engine that reads logits: the policy's choice is forced
            text = request.choose(script.choice_probs) + text[text.index('"') :]
        pieces = [text[i : i + 4] for i in range(0, len(text), 4)]
        out: list[str] = []
        finish = Finish.STOP
        for index, piece in enumerate(pieces):
            if time.monotonic() >= request.deadline:
                finish = Finish.DEADLINE
                break
            if index >= request.max_tokens:
                finish = Finish.LENGTH
                break
            time.sleep(script.token_delay_s)
            out.append(piece)
            # ids are a function of the text, as with a real tokenizer
            if on_token is not None and on_token(zlib.crc32(piece.encode()), piece):
                finish = Finish.HOOK
                break
        return Generation(
            text="".join(out),
            finish=finish,
            prompt_tokens=sum(self.count_tokens(m.content) for m in request.prompt.messages),
            completion_tokens=len(out),
            prefill_s=prefill,
            decode_s=time.monotonic() - start - prefill,
            choice_probs=dict(script.choice_probs),
        )

    def health(self) -> bool:
        return self.loaded

    def close(self) -> None:
        self.loaded = False
