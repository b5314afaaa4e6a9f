"""llama.cpp through llama-cpp-python: any GGUF that llama.cpp supports.

The prompt is rendered with the model's own chat template (from the GGUF) and tokenised so that
message content can never become control tokens: the template's own text is tokenised with
special-token parsing on, the content with it off. A model without a template gets raw
completion, never a silently guessed template."""

from __future__ import annotations

import codecs
import ctypes
import logging
import time
from dataclasses import dataclass, field
from functools import lru_cache
from pathlib import Path
from typing import Any, Literal

from service.backends.base import (
    Finish,
    Generation,
    GenerationRequest,
    HiddenStates,
    Prompt,
    TokenHook,
)
from service.backends.chat import (
    check_fits,
    choice_table,
    raw_completion,
    slotted_messages,
    tokenize_slotted,
)
from service.backends.guidance import (
    GrammarCompiler,
    GuidanceLogitsProcessor,
    TokenMask,
    llama_cpp_tokenizer,
    require_guidance,
)
from service.errors import (
    BackendDeadlineError,
    BackendError,
    BackendUnavailableError,
    EngineMissingError,
)
from service.ops.weights import model_sha256

try:  # an import guard: a missing engine must not break the other backends
    import llama_cpp
    import numpy as np
    from llama_cpp import Llama, LogitsProcessorList, StoppingCriteriaList
    from llama_cpp import _internals as llama_internals
    from llama_cpp._ggml import libggml
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_grammar import LlamaGrammar

    _ENGINE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only where llama-cpp-python is absent
    _ENGINE_ERROR = str(exc)

logger = logging.getLogger(__name__)


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


@lru_cache(maxsize=1)
def _ggml() -> Any:
    """The three ggml functions that read a tensor in llama.cpp's eval callback."""
    libggml.ggml_get_name.restype = ctypes.c_char_p
    libggml.ggml_get_name.argtypes = [ctypes.c_void_p]
    libggml.ggml_nbytes.restype = ctypes.c_size_t
    libggml.ggml_nbytes.argtypes = [ctypes.c_void_p]
    libggml.ggml_backend_tensor_get.restype = None
    libggml.ggml_backend_tensor_get.argtypes = [
        ctypes.c_void_p,
        ctypes.c_void_p,
        ctypes.c_size_t,
        ctypes.c_size_t,
    ]
    return libggml


@dataclass
class _Capture:
    """What the eval callback copies out during one prefill: for each wanted layer output
    ("l_out-N", the residual stream after block N), the rows of the wanted positions, and the
    sum of the rows of a span (kept as a running sum: a span may be thousands of tokens)."""

    names: dict[bytes, int]  # tensor name -> row in `out`
    positions: list[int]  # absolute token positions, in the order of `out`'s second axis
    start: int  # absolute position of the first evaluated token
    n_embd: int
    span: tuple[int, int] = (0, 0)  # absolute positions [first, end) to sum
    stop_row: int = -1  # once armed, the forward pass stops after this layer row is read
    out: Any = None
    span_sum: Any = None  # (layers, n_embd)
    seen: dict[int, int] = field(default_factory=dict)  # layer row -> tokens seen so far

    def __post_init__(self) -> None:
        self.out = np.zeros((len(self.names), len(self.positions), self.n_embd), np.float32)
        self.span_sum = np.zeros((len(self.names), self.n_embd), np.float64)


@lru_cache(maxsize=64)
def _compile_grammar(gbnf: str) -> Any:
    return LlamaGrammar.from_string(gbnf, verbose=False)


class LlamaCppBackend:
    engine = "llama_cpp"

    def __init__(
        self,
        model: str,
        path: Path,
        *,
        n_ctx: int = 4096,
        n_threads: int | None = None,
        n_batch: int = 512,
        chat_template: str = "auto",
        hidden_states: bool = False,
        sha256: str | None = None,
        grammar_engine: Literal["llguidance", "llama_cpp"] = "llguidance",
        flash_attn: bool = True,
    ) -> None:
        if _ENGINE_ERROR is not None:
            raise EngineMissingError(f"llama-cpp-python is not installed: {_ENGINE_ERROR}")
        if grammar_engine == "llguidance":
            require_guidance()
        self._grammar_engine = grammar_engine
        self._flash_attn = flash_attn
        self._grammars: GrammarCompiler | None = None
        self.model = model
        self._path = path
        self._n_ctx = n_ctx
        self._n_threads = n_threads
        self._n_batch = n_batch
        self._use_template = chat_template == "auto"
        self._llm: Any = None
        self._formatter: Any = None
        self._bos: list[int] = []
        self._choice_ids: dict[tuple[str, ...], dict[str, list[int]]] = {}
        self._abort_at = float("inf")
        self._abort_cb: Any = None
        # llama.cpp calls the eval callback for every graph node of every evaluation, so it is
        # installed only for tiers that read hidden states (a probe), and does nothing unarmed
        self._read_hidden = hidden_states
        self._sha256 = sha256
        self._eval_cb: Any = None
        self._capture: _Capture | None = None
        self._own_ctx: Any = None

    @property
    def context_size(self) -> int:
        return self._n_ctx

    def load(self) -> None:
        try:
            self._llm = Llama(
                model_path=str(self._path),
                n_ctx=self._n_ctx,
                n_threads=self._n_threads,
                n_batch=self._n_batch,
                flash_attn=self._flash_attn,
                verbose=False,
            )
        except (ValueError, RuntimeError, OSError) as exc:
            raise BackendError(f"cannot load {self._path}: {exc}") from exc
        llm = self._llm
        template = llm.metadata.get("tokenizer.chat_template") if self._use_template else None
        if template:
            self._formatter = Jinja2ChatFormatter(
                template=template,
                eos_token=self._piece(llm.token_eos()),
                bos_token=self._piece(llm.token_bos()),
                add_generation_prompt=True,
            )
        self._bos = llm.tokenize(b"", add_bos=True, special=True)
        if self._grammar_engine == "llguidance":
            self._grammars = GrammarCompiler(llama_cpp_tokenizer(llm._model.vocab))
        if self._read_hidden:
            self._install_eval_callback(llm)
        # Prefill cannot be interrupted from Python between tokens: llama.cpp's abort callback
        # stops it inside the graph at the deadline. It is installed only during prefill,
        # because ggml calls it for every graph node.
        self._abort_cb = llama_cpp.ggml_abort_callback(
            lambda _data: time.monotonic() >= self._abort_at
        )
        logger.info("loaded %s from %s (chat template: %s)", self.model, self._path, bool(template))

    def _install_eval_callback(self, llm: Any) -> None:
        """Rebuild the context with an eval callback: llama.cpp takes it only at creation."""
        ggml = _ggml()
        row_bytes = 4 * llm.n_embd()

        def on_tensor(tensor: int, ask: bool, _data: Any) -> bool:
            capture = self._capture
            if capture is None:
                return False  # unarmed: the whole graph runs as one piece
            row = capture.names.get(ggml.ggml_get_name(tensor))
            if ask or row is None:
                return row is not None
            rows = ggml.ggml_nbytes(tensor) // row_bytes
            first = capture.start + capture.seen.get(row, 0)
            capture.seen[row] = capture.seen.get(row, 0) + rows
            for j, pos in enumerate(capture.positions):
                if first <= pos < first + rows:
                    dst = capture.out[row, j].ctypes.data
                    ggml.ggml_backend_tensor_get(tensor, dst, (pos - first) * row_bytes, row_bytes)
            lo, hi = max(first, capture.span[0]), min(first + rows, capture.span[1])
            if lo < hi:  # the span's rows in this batch are contiguous: one copy, then a sum
                block = np.empty((hi - lo, capture.out.shape[2]), np.float32)
                ggml.ggml_backend_tensor_get(
                    tensor, block.ctypes.data, (lo - first) * row_bytes, (hi - lo) * row_bytes
                )
                capture.span_sum[row] += block.sum(axis=0)
            # False ends the graph's computation here: the blocks above are skipped
            return row != capture.stop_row

        self._eval_cb = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
        params = llm.context_params
        params.cb_eval = self._eval_cb
        params.cb_eval_user_data = None
        ctx = llama_internals.LlamaContext(model=llm._model, params=params, verbose=False)
        old, llm._ctx = llm._ctx, ctx
        old.close()
        self._own_ctx = ctx

    @property
    def model_sha256(self) -> str:
        return model_sha256(self._path, self._sha256)

    @property
    def n_layers(self) -> int:
        return int(llama_cpp.llama_model_n_layer(self._require()._model.model))

    def _mark_positions(self, tokens: list[int], marks: tuple[str, ...]) -> list[int]:
        """The token position that ends each mark, the marks being found in order at the end
        of the prompt (after the last occurrence of the first one)."""
        if not marks:
            return []
        llm = self._require()
        ends: list[int] = []  # byte offset, from the start of `tail`, where each token ends
        tail = b""
        for token in reversed(tokens):
            tail = token_bytes(llm, token, special=True) + tail
            ends.append(len(tail))
            if marks[0].encode() in tail:  # the last occurrence is now in the tail
                break
        cuts = [len(tail) - e for e in reversed(ends)]  # token k of the tail starts at cuts[k]
        first_tok = len(tokens) - len(cuts)
        at = tail.rfind(marks[0].encode())
        positions = []
        for mark in marks:
            found = tail.find(mark.encode(), at)
            if found < 0 or at < 0:
                raise BackendError(f"mark {mark!r} is not in the prompt")
            end = found + len(mark.encode()) - 1  # the mark's last byte
            k = max(i for i, c in enumerate(cuts) if c <= end)
            positions.append(first_tok + k)
            at = found + len(mark.encode())
        return positions

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
        """The residual stream after `layers` at the last token and at the end of each mark;
        with `span` (two marks, found as `marks` are; no second one: up to the last token),
        also its mean over every token after the end of the first mark up to the end of the
        second (`span_mean`: a probe may read the proposed action's tokens). With `until`,
        the prompt is evaluated only through the end of that mark's last occurrence, which
        is then the last token: a call on the whole prompt that follows evaluates only the
        rest, its prefix being in the KV cache. With `shallow_after`, the tokens after the end
        of that mark go through the network only up to the deepest layer in `layers` (the
        blocks above, and the logits, are skipped), and the KV cache keeps nothing of them: a
        read that nothing generates from after it, at a fraction of the cost."""
        llm = self._require()
        if self._eval_cb is None:
            raise BackendError(f"{self.model} was loaded without hidden-state reading")
        last_layer = self.n_layers - 1
        if any(not 0 <= layer < last_layer for layer in layers):
            # llama.cpp keeps only the output rows in the last block
            raise BackendError(f"layers must lie in 0..{last_layer - 1}, got {layers}")
        tokens = self.tokenize_prompt(prompt)
        check_fits(len(tokens), 1, self._n_ctx)
        if until is not None:
            (stop,) = self._mark_positions(tokens, (until,))
            tokens = tokens[: stop + 1]
        spanned = (0, 0)  # [first, end) token positions to average
        if span is not None:
            opened, *closed = self._mark_positions(tokens, tuple(m for m in span if m))
            spanned = (opened + 1, (closed or [len(tokens) - 1])[0] + 1)
        positions = [*self._mark_positions(tokens, marks), len(tokens) - 1]
        cached = 0
        for have, want in zip(llm._input_ids[: llm.n_tokens], tokens, strict=False):
            if have != want:
                break
            cached += 1
        # every wanted position is evaluated again
        cached = min(cached, *positions, *([spanned[0]] if span is not None else []))
        deep = len(tokens)  # tokens before this go through the whole network
        if shallow_after is not None:
            if choices:
                raise BackendError("a shallow read has no logits to read choices from")
            (end,) = self._mark_positions(tokens, (shallow_after,))
            deep = max(cached, end + 1)
        capture = _Capture(
            names={f"l_out-{layer}".encode(): k for k, layer in enumerate(layers)},
            positions=positions,
            start=cached,
            n_embd=llm.n_embd(),
            span=spanned,
        )
        start = time.monotonic()
        llm.n_tokens = cached  # eval drops the KV cache past this point
        try:
            self._watch_prefill(deadline)
            self._capture = capture
            if deep > cached:
                llm.eval(tokens[cached:deep])
            if deep < len(tokens):
                capture.stop_row = layers.index(max(layers))
                llm.eval(tokens[deep:])
                llm.n_tokens = deep  # the skipped blocks left no KV for these tokens
        except (RuntimeError, ValueError, OSError) as exc:
            llm.n_tokens = 0  # the cache is in an unknown state
            if deadline is not None and time.monotonic() >= deadline:
                raise BackendDeadlineError("prefill stopped at the deadline") from exc
            raise BackendError(f"llama.cpp prefill failed: {exc}") from exc
        finally:
            self._capture = None
            self._watch_prefill(None)
        prefill_s = time.monotonic() - start
        probs: dict[str, float] = {}
        if choices:
            logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
            p = np.exp(logits - logits.max())
            total = float(p.sum())
            for word, ids in self._choices(choices).items():
                probs[word] = float(p[ids].sum()) / total
        return HiddenStates(
            layers=layers,
            last=capture.out[:, -1, :].copy(),
            marks=capture.out[:, :-1, :].copy(),
            span_mean=(
                (capture.span_sum / (spanned[1] - spanned[0])).astype(np.float32)
                if spanned[1] > spanned[0]
                else None
            ),
            prompt_tokens=len(tokens),
            cached_tokens=cached,
            prefill_s=prefill_s,
            choice_probs=probs,
        )

    def _watch_prefill(self, deadline: float | None) -> None:
        self._abort_at = deadline if deadline is not None else float("inf")
        # a CFUNCTYPE built with no argument is the NULL pointer: no callback at all
        callback = self._abort_cb if deadline is not None else llama_cpp.ggml_abort_callback()
        llama_cpp.llama_set_abort_callback(self._llm._ctx.ctx, callback, None)

    def _piece(self, token: int) -> str:
        if token < 0:
            return ""
        return token_bytes(self._llm, token, special=True).decode("utf-8", "replace")

    def _require(self) -> Any:
        if self._llm is None:
            raise BackendUnavailableError(f"model {self.model} is not loaded")
        return self._llm

    def count_tokens(self, text: str) -> int:
        return len(self._tokenize(text, special=False))

    def tokenize_prompt(self, prompt: Prompt) -> list[int]:
        """Tokens of the rendered prompt, with content tokenised as plain text."""
        llm = self._require()
        if self._formatter is not None:
            rendered: str = self._formatter(messages=slotted_messages(prompt)).prompt
            bos_text = self._piece(llm.token_bos())
            if self._bos and bos_text and rendered.startswith(bos_text):
                rendered = rendered[len(bos_text) :]  # the tokenizer adds BOS itself
        else:
            rendered = raw_completion(prompt)
        return list(self._bos) + tokenize_slotted(
            rendered,
            prompt,
            template_text=lambda text: self._tokenize(text, special=True),
            content=lambda text: self._tokenize(text, special=False),
        )

    def _tokenize(self, text: str, *, special: bool) -> list[int]:
        tokens: list[int] = self._require().tokenize(
            text.encode("utf-8"), add_bos=False, special=special
        )
        return tokens

    def _choices(self, choices: tuple[str, ...]) -> dict[str, list[int]]:
        if choices not in self._choice_ids:
            self._choice_ids[choices] = choice_table(
                choices, lambda text: self._tokenize(text, special=False)
            )
        return self._choice_ids[choices]

    def generate(self, request: GenerationRequest, on_token: TokenHook | None = None) -> Generation:
        llm = self._require()
        tokens = self.tokenize_prompt(request.prompt)
        check_fits(len(tokens), request.max_tokens, self._n_ctx)
        choice_probs: dict[str, float] = {}
        table = self._choices(request.constraint.choices) if request.constraint.choices else {}

        def read_choices(_ids: Any, scores: Any) -> Any:
            # Only the first position carries the choice; later calls cost one comparison.
            if not table or choice_probs:
                return scores
            z = scores - scores.max()
            p = np.exp(z)
            total = float(p.sum())
            for word, ids in table.items():
                choice_probs[word] = float(p[ids].sum()) / total
            if request.choose is not None:
                # Force the policy's choice: greedy sampling would pick the likeliest single
                # token, which can differ from the likeliest word when a word's mass is split
                # over several of its prefixes.
                forced = table[request.choose(dict(choice_probs))][-1]
                scores[:] = -np.inf
                scores[forced] = 0.0
            return scores

        processors: list[Any] = [read_choices] if table else []
        mask: TokenMask | None = None
        grammar: Any = None
        if request.constraint.gbnf and self._grammars is not None:
            matcher = self._grammars.matcher(request.constraint.gbnf)
            mask = TokenMask(matcher, llm.n_vocab(), llm.token_eos())
            processors.append(GuidanceLogitsProcessor(mask))  # last: its mask is final
        elif request.constraint.gbnf:
            grammar = _compile_grammar(request.constraint.gbnf)

        def past_deadline(_ids: Any, _logits: Any) -> bool:
            return time.monotonic() >= request.deadline

        cached = 0
        for have, want in zip(llm._input_ids[: llm.n_tokens], tokens, strict=False):
            if have != want:
                break
            cached += 1
        decoder = codecs.getincrementaldecoder("utf-8")("replace")
        pieces: list[str] = []
        finish = Finish.LENGTH
        start = time.monotonic()
        first_token_at: float | None = None
        count = 0
        try:
            self._watch_prefill(request.deadline)
            llm.set_seed(request.seed)
            stream = llm.generate(
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
            try:
                for token in stream:
                    if first_token_at is None:
                        first_token_at = time.monotonic()
                        self._watch_prefill(None)
                    if llama_cpp.llama_vocab_is_eog(llm._model.vocab, token):
                        finish = Finish.STOP
                        break
                    count += 1
                    piece = decoder.decode(token_bytes(llm, token))
                    pieces.append(piece)
                    if on_token is not None and on_token(token, piece):
                        finish = Finish.HOOK
                        break
                    if time.monotonic() >= request.deadline:
                        finish = Finish.DEADLINE
                        break
                    if count >= request.max_tokens:
                        finish = Finish.LENGTH
                        break
                else:
                    # llama-cpp-python's generator ends only through stopping_criteria
                    finish = Finish.DEADLINE
            finally:
                stream.close()
                self._watch_prefill(None)
        except (RuntimeError, ValueError, OSError) as exc:
            if time.monotonic() >= request.deadline:  # aborted in prefill at the deadline
                finish = Finish.DEADLINE
            else:
                raise BackendError(f"llama.cpp generation failed: {exc}") from exc
        if mask is not None and mask.error is not None:
            # a bug between engine and grammar, not model noise: never retried as an answer
            raise BackendError(f"constrained decoding failed: {mask.error}")
        end = time.monotonic()
        first = first_token_at or end
        pieces.append(decoder.decode(b"", final=True))
        return Generation(
            text="".join(pieces),
            finish=finish,
            prompt_tokens=len(tokens),
            cached_tokens=min(cached, len(tokens) - 1),
            completion_tokens=count,
            prefill_s=first - start,
            decode_s=end - first,
            choice_probs=choice_probs,
        )

    def health(self) -> bool:
        return self._llm is not None

    def close(self) -> None:
        if self._own_ctx is not None:
            self._own_ctx.close()  # before the model it belongs to
            self._own_ctx = None
        if self._grammars is not None:
            self._grammars.clear()
        if self._llm is not None:
            self._llm.close()
            self._llm = None
