"""MLX through mlx-lm: the fastest way to run small models on Apple silicon (and, slowly, on
Linux CPUs with mlx[cpu]).

Same contract as the llama.cpp backend: the prompt is rendered with the model's own chat
template with message content tokenised as plain text, the response prefix is prefilled, and
the text after it is held to the request's grammar token by token. The grammar is enforced by
llguidance as a logits processor. llguidance's JSON-schema front end does not implement the
schema's if/then/else (revision exactly when 'revise'), so the backend gives it the GBNF that
the same constraint builder derives from that schema; llama.cpp enforces the same GBNF, so both
engines accept exactly the same answers."""

from __future__ import annotations

import logging
import time
from dataclasses import dataclass, field
from typing import Any

from service.backends.base import Finish, Generation, GenerationRequest, Prompt, TokenHook
from service.backends.chat import (
    check_fits,
    choice_table,
    raw_completion,
    slotted_messages,
    tokenize_slotted,
)
from service.backends.guidance import GrammarCompiler, TokenMask
from service.errors import BackendError, BackendUnavailableError, EngineMissingError

try:  # an import guard: a missing engine must not break the other backends
    import llguidance.hf
    import mlx.core as mx
    import numpy as np
    from mlx_lm import load as mlx_load
    from mlx_lm.generate import generate_step
    from mlx_lm.sample_utils import make_logits_processors, make_sampler

    _ENGINE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only where mlx-lm is absent
    _ENGINE_ERROR = str(exc)

logger = logging.getLogger(__name__)

# Prefill runs in chunks of this many tokens; the deadline is checked between chunks.
_PREFILL_CHUNK = 256


class _PastDeadline(Exception):
    """Raised from mlx-lm's prefill progress callback to stop prefill at the deadline."""


class _Grammar:
    """An mlx-lm logits processor that holds generation to a grammar with llguidance, and
    reads (and may force) the choice at the first position."""

    def __init__(
        self, mask: TokenMask, table: dict[str, list[int]], request: GenerationRequest
    ) -> None:
        self.mask = mask
        self._table = table
        self._request = request
        self._bit = mx.arange(32, dtype=mx.int32)
        self._first = True
        self.choice_probs: dict[str, float] = {}

    def __call__(self, tokens: Any, logits: Any) -> Any:
        if self._first:
            self._first = False
            logits = self._choose(logits)
        else:
            self.mask.consume(int(tokens[-1].item()))
        words = mx.array(self.mask.words())
        allowed = ((words[:, :, None] >> self._bit) & 1).reshape(1, -1)
        width = logits.shape[-1]
        if allowed.shape[-1] < width:  # the model's embedding may be padded past the vocab
            pad = mx.zeros((1, width - allowed.shape[-1]), dtype=allowed.dtype)
            allowed = mx.concatenate([allowed, pad], axis=-1)
        return mx.where(allowed[:, :width] == 1, logits, -mx.inf)

    def _choose(self, logits: Any) -> Any:
        if not self._table:
            return logits
        probs = np.array(mx.softmax(logits[0].astype(mx.float32)))
        for word, ids in self._table.items():
            self.choice_probs[word] = float(probs[ids].sum())
        if self._request.choose is None:
            return logits
        # the policy's word, through its longest single-token prefix (as llama.cpp does)
        forced = self._table[self._request.choose(dict(self.choice_probs))][-1]
        only = mx.arange(logits.shape[-1]) == forced
        return mx.where(only[None, :], logits, -mx.inf)


@dataclass
class _Decoding:
    """What one generation has decoded so far."""

    start: float
    pieces: list[str] = field(default_factory=list)
    count: int = 0
    first_at: float | None = None
    finish: Finish = Finish.LENGTH

    def generation(self, prompt_tokens: int, choice_probs: dict[str, float]) -> Generation:
        """The finished generation, timed from `start` to now."""
        end = time.monotonic()
        first = self.first_at or end
        return Generation(
            text="".join(self.pieces),
            finish=self.finish,
            prompt_tokens=prompt_tokens,
            completion_tokens=self.count,
            prefill_s=first - self.start,
            decode_s=end - first,
            choice_probs=choice_probs,
        )


def _decode(
    steps: Any,
    eos: Any,
    detokenizer: Any,
    request: GenerationRequest,
    on_token: TokenHook | None,
    run: _Decoding,
) -> Finish:
    """Take tokens from mlx-lm's steps into `run` until one of the request's ends."""
    for step, _logprobs in steps:
        token = int(step)  # mlx-lm yields plain ints despite its annotation
        if run.first_at is None:
            run.first_at = time.monotonic()
        if token in eos:
            return Finish.STOP
        run.count += 1
        detokenizer.add_token(token)
        piece = detokenizer.last_segment
        run.pieces.append(piece)
        if on_token is not None and on_token(token, piece):
            return Finish.HOOK
        if time.monotonic() >= request.deadline:
            return Finish.DEADLINE
    return Finish.LENGTH  # mlx-lm stops at max_tokens


class MlxBackend:
    engine = "mlx"

    def __init__(self, model: str, *, n_ctx: int = 4096) -> None:
        if _ENGINE_ERROR is not None:
            raise EngineMissingError(f"mlx-lm is not installed: {_ENGINE_ERROR}")
        self.model = model
        self._n_ctx = n_ctx
        self._model: Any = None
        self._tokenizer: Any = None
        self._ll_tokenizer: Any = None
        self._grammars: GrammarCompiler | None = None
        self._choice_ids: dict[tuple[str, ...], dict[str, list[int]]] = {}

    @property
    def context_size(self) -> int:
        return self._n_ctx

    def load(self) -> None:
        try:
            loaded = mlx_load(self.model)
            self._model, self._tokenizer = loaded[0], loaded[1]
            hf = self._tokenizer._tokenizer
            self._ll_tokenizer = llguidance.hf.from_tokenizer(
                hf, eos_token=sorted(self._tokenizer.eos_token_ids)
            )
            self._grammars = GrammarCompiler(self._ll_tokenizer)
        except (ValueError, OSError, KeyError, RuntimeError) as exc:
            raise BackendError(f"cannot load the MLX model {self.model}: {exc}") from exc
        logger.info("loaded %s with mlx-lm on %s", self.model, mx.default_device())

    def _require(self) -> Any:
        if self._model is None:
            raise BackendUnavailableError(f"model {self.model} is not loaded")
        return self._tokenizer

    def _encode(self, text: str, *, special: bool) -> list[int]:
        backend = self._require()._tokenizer.backend_tokenizer
        backend.encode_special_tokens = not special  # False: control-token text stays text
        try:
            return list(backend.encode(text, add_special_tokens=False).ids)
        finally:
            backend.encode_special_tokens = False

    def count_tokens(self, text: str) -> int:
        return len(self._encode(text, special=False))

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Tokens of the rendered prompt, with content tokenised as plain text."""
        tokenizer = self._require()
        if tokenizer.chat_template:
            rendered: str = tokenizer.apply_chat_template(
                slotted_messages(prompt), tokenize=False, add_generation_prompt=True
            )
        else:
            rendered = raw_completion(prompt)
        return tokenize_slotted(
            rendered,
            prompt,
            template_text=lambda text: self._encode(text, special=True),
            content=lambda text: self._encode(text, special=False),
        )

    def generate(self, request: GenerationRequest, on_token: TokenHook | None = None) -> Generation:
        tokenizer = self._require()
        tokens = self.tokenize_prompt(request.prompt)
        check_fits(len(tokens), request.max_tokens, self._n_ctx)
        grammar = self._grammar(request)
        processors = make_logits_processors(
            repetition_penalty=request.repeat_penalty if request.repeat_penalty != 1.0 else None,
            presence_penalty=request.presence_penalty or None,
            frequency_penalty=request.frequency_penalty or None,
        )
        eos = tokenizer.eos_token_ids
        detokenizer = tokenizer.detokenizer
        detokenizer.reset()
        run = _Decoding(start=time.monotonic())
        mx.random.seed(request.seed)
        # the grammar last: its mask is final
        steps = self._steps(tokens, request, [*processors, grammar])
        try:
            run.finish = _decode(steps, eos, detokenizer, request, on_token, run)
        except _PastDeadline:
            run.finish = Finish.DEADLINE
        except (RuntimeError, ValueError) as exc:
            raise BackendError(f"mlx-lm generation failed: {exc}") from exc
        finally:
            steps.close()
        if grammar.mask.error is not None:
            raise BackendError(f"constrained decoding failed: {grammar.mask.error}")
        detokenizer.finalize()
        run.pieces.append(detokenizer.last_segment)
        return run.generation(len(tokens), grammar.choice_probs)

    def _grammar(self, request: GenerationRequest) -> _Grammar:
        """The logits processor that holds the request to its grammar and reads its choice."""
        choices = request.constraint.choices
        if choices and choices not in self._choice_ids:
            self._choice_ids[choices] = choice_table(
                choices, lambda text: self._encode(text, special=False)
            )
        assert self._grammars is not None  # set by load, as the model is
        mask = TokenMask(
            self._grammars.matcher(request.constraint.gbnf),
            self._ll_tokenizer.vocab_size,
            self._ll_tokenizer.eos_token,
        )
        return _Grammar(mask, self._choice_ids.get(choices, {}), request)

    def _steps(self, tokens: list[int], request: GenerationRequest, processors: list[Any]) -> Any:
        """mlx-lm's token generator for the request; its prefill stops at the deadline."""

        def progress(_done: int, _total: int) -> None:
            if time.monotonic() >= request.deadline:
                raise _PastDeadline()

        return generate_step(
            mx.array(tokens),
            self._model,
            max_tokens=request.max_tokens,
            sampler=make_sampler(request.temperature, top_p=0.95, min_p=0.05, top_k=40),
            logits_processors=processors,
            prefill_step_size=_PREFILL_CHUNK,
            prompt_progress_callback=progress,
        )

    def health(self) -> bool:
        return self._model is not None

    def close(self) -> None:
        self._model = None
        self._tokenizer = None
        if self._grammars is not None:
            self._grammars.clear()
