"""The steps of one generation with llama.cpp: a token's bytes, the logits processor that reads
(and may force) the choice, the token stream, and the loop that decodes it into text until the
request ends. `LlamaCppBackend.generate` runs these steps; this module holds no model."""

from __future__ import annotations

import codecs
import ctypes
import time
from collections.abc import Callable
from dataclasses import dataclass, field
from typing import Any

from service.backends.base import ChoicePolicy, Finish, Generation, GenerationRequest, TokenHook

try:  # an import guard: llama_cpp.py reports a missing engine
    import llama_cpp
    import numpy as np
    from llama_cpp import LogitsProcessorList, StoppingCriteriaList
except ImportError:  # pragma: no cover - exercised only where llama-cpp-python is absent
    pass


def token_bytes(llm: Any, token: int, special: bool = False) -> bytes:
    """The bytes of one token. `Llama.detokenize` decodes into a 32-byte buffer and returns
    nothing for a longer piece, and Qwen's vocabulary has single tokens for runs of up to 128
    blanks or dots: the served text lost them and the loop detector never saw the run."""
    size = 64
    while True:
        buffer = ctypes.create_string_buffer(size)
        n = llama_cpp.llama_token_to_piece(
            llm._model.vocab, llama_cpp.llama_token(token), buffer, size, 0, special
        )
        if n >= 0:
            return buffer.raw[:n]
        size = -n


class ChoiceReader:
    """A logits processor that reads the choice's probabilities at the first position and,
    with a policy (`choose`), forces the word it picks."""

    def __init__(self, table: dict[str, list[int]], choose: ChoicePolicy | None) -> None:
        self._table = table
        self._choose = choose
        self.probs: dict[str, float] = {}

    def __call__(self, _ids: Any, scores: Any) -> Any:
        # Only the first position carries the choice; later calls cost one comparison.
        if not self._table or self.probs:
            return scores
        z = scores - scores.max()
        p = np.exp(z)
        total = float(p.sum())
        for word, ids in self._table.items():
            self.probs[word] = float(p[ids].sum()) / total
        if self._choose is not None:
            # Force the policy's choice: greedy sampling would pick the likeliest single
            # token, which can differ from the likeliest word when a word's mass is split
            # over several of its prefixes.
            forced = self._table[self._choose(dict(self.probs))][-1]
            scores[:] = -np.inf
            scores[forced] = 0.0
        return scores


@dataclass
class Decoding:
    """What one generation has decoded so far; kept when prefill is aborted at the deadline."""

    start: float
    # a character may span tokens
    decoder: Any = field(default_factory=lambda: codecs.getincrementaldecoder("utf-8")("replace"))
    pieces: list[str] = field(default_factory=list)
    count: int = 0
    first_at: float | None = None
    finish: Finish = Finish.LENGTH

    def generation(
        self, prompt_tokens: int, cached: int, choice_probs: dict[str, float]
    ) -> Generation:
        """The finished generation, timed from `start` to now."""
        end = time.monotonic()
        first = self.first_at or end
        self.pieces.append(self.decoder.decode(b"", final=True))
        return Generation(
            text="".join(self.pieces),
            finish=self.finish,
            prompt_tokens=prompt_tokens,
            cached_tokens=min(cached, prompt_tokens - 1),
            completion_tokens=self.count,
            prefill_s=first - self.start,
            decode_s=end - first,
            choice_probs=choice_probs,
        )


def token_stream(
    llm: Any,
    tokens: list[int],
    request: GenerationRequest,
    processors: list[Any],
    grammar: Any,
) -> Any:
    """llama-cpp-python's token generator for the request, stopped at its deadline."""

    def past_deadline(_ids: Any, _logits: Any) -> bool:
        return time.monotonic() >= request.deadline

    return llm.generate(
        tokens,
        temp=request.temperature,
        top_k=40,
        top_p=0.95,
        min_p=0.05,
        repeat_penalty=request.repeat_penalty,
        presence_penalty=request.presence_penalty,
        frequency_penalty=request.frequency_penalty,
        logits_processor=LogitsProcessorList(processors) if processors else None,
        stopping_criteria=StoppingCriteriaList([past_deadline]),
        grammar=grammar,
    )


def decode(
    llm: Any,
    stream: Any,
    request: GenerationRequest,
    on_token: TokenHook | None,
    run: Decoding,
    on_first: Callable[[], None],
) -> Finish:
    """Take tokens from the stream into `run` until one of the request's ends; `on_first` is
    called when the first token comes (prefill is over)."""
    for token in stream:
        if run.first_at is None:
            run.first_at = time.monotonic()
            on_first()
        if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
            return Finish.STOP
        run.count += 1
        piece = run.decoder.decode(token_bytes(llm, token))
        run.pieces.append(piece)
        if on_token is not None and on_token(token, piece):
            return Finish.HOOK
        if time.monotonic() >= request.deadline:
            return Finish.DEADLINE
        if run.count >= request.max_tokens:
            return Finish.LENGTH
    # llama-cpp-python's generator ends only through stopping_criteria
    return Finish.DEADLINE
