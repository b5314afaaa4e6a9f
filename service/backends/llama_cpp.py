"""llama.cpp through llama-cpp-python: any GGUF that llama.cpp supports.

The prompt is rendered with the model's own chat template (from the GGUF) and tokenised so that
message content can never become control tokens: the template's own text is tokenised with
special-token parsing on, the content with it off. A model without a template gets raw
completion, never a silently guessed template."""

from __future__ import annotations

import logging
import time
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
from service.backends.llama_decode import (
    ChoiceReader,
    Decoding,
    decode,
    token_bytes,
    token_stream,
)
from service.backends.llama_hidden import (
    Capture,
    HiddenRead,
    cached_prefix,
    capture_for,
    choice_probs,
    hidden_states_of,
    install_eval_callback,
    mark_positions,
    plan_read,
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
    from llama_cpp import Llama
    from llama_cpp.llama_chat_format import Jinja2ChatFormatter
    from llama_cpp.llama_grammar import LlamaGrammar

    _ENGINE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only where llama-cpp-python is absent
    _ENGINE_ERROR = str(exc)

logger = logging.getLogger(__name__)


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
        self._capture: Capture | None = None
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
            self._eval_cb, self._own_ctx = install_eval_callback(llm, lambda: self._capture)
        # Prefill cannot be interrupted from Python between tokens: llama.cpp's abort callback
        # stops it inside the graph at the deadline. It is installed only during prefill,
        # because ggml calls it for every graph node.
        self._abort_cb = llama_cpp.ggml_abort_callback(
            lambda _data: time.monotonic() >= self._abort_at
        )
        logger.info("loaded %s from %s (chat template: %s)", self.model, self._path, bool(template))

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
        return mark_positions(tokens, marks, lambda token: token_bytes(llm, token, special=True))

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
        read = plan_read(
            llm,
            tokens,
            self._mark_positions,
            marks=marks,
            span=span,
            until=until,
            shallow_after=shallow_after,
            choices=choices,
        )
        capture = capture_for(llm, read, layers)
        start = time.monotonic()
        self._prefill_capturing(llm, read, capture, layers, deadline)
        prefill_s = time.monotonic() - start
        probs = choice_probs(llm, self._choices(choices)) if choices else {}
        return hidden_states_of(capture, read, layers, prefill_s, probs)

    def _prefill_capturing(
        self,
        llm: Any,
        read: HiddenRead,
        capture: Capture,
        layers: tuple[int, ...],
        deadline: float | None,
    ) -> None:
        """Evaluate the read's tokens past the cache with the eval callback armed: through the
        whole network up to `read.deep`, the rest only up to the deepest of `layers`."""
        tokens, cached, deep = read.tokens, read.cached, read.deep
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
        table = self._choices(request.constraint.choices) if request.constraint.choices else {}
        reader = ChoiceReader(table, request.choose)
        processors: list[Any] = [reader] if table else []
        mask: TokenMask | None = None
        grammar: Any = None
        if request.constraint.gbnf and self._grammars is not None:
            matcher = self._grammars.matcher(request.constraint.gbnf)
            mask = TokenMask(matcher, llm.n_vocab(), llm.token_eos())
            processors.append(GuidanceLogitsProcessor(mask))  # last: its mask is final
        elif request.constraint.gbnf:
            grammar = _compile_grammar(request.constraint.gbnf)
        cached = cached_prefix(llm, tokens)
        run = Decoding(start=time.monotonic())
        try:
            self._watch_prefill(request.deadline)
            llm.set_seed(request.seed)
            stream = token_stream(llm, tokens, request, processors, grammar)
            try:
                run.finish = decode(
                    llm, stream, request, on_token, run, on_first=lambda: self._watch_prefill(None)
                )
            finally:
                stream.close()
                self._watch_prefill(None)
        except (RuntimeError, ValueError, OSError) as exc:
            if time.monotonic() >= request.deadline:  # aborted in prefill at the deadline
                run.finish = Finish.DEADLINE
            else:
                raise BackendError(f"llama.cpp generation failed: {exc}") from exc
        if mask is not None and mask.error is not None:
            # a bug between engine and grammar, not model noise: never retried as an answer
            raise BackendError(f"constrained decoding failed: {mask.error}")
        return run.generation(len(tokens), cached, reader.probs)

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
