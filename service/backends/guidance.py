"""Grammar-constrained decoding with llguidance, shared by the llama.cpp and MLX backends.

llama.cpp's own GBNF sampler checks the grammar against every candidate token, so its cost
grows with the vocabulary: on Qwen's 151k tokens it took a third of the decode time. llguidance
computes the set of allowed tokens as a bitmask from a lexer and a token trie (tens of
microseconds a token), and the backend applies it to the logits. Both engines are given the
same GBNF, so they accept exactly the same answers."""

from __future__ import annotations

from collections import OrderedDict
from typing import Any

from service.errors import BackendError, EngineMissingError

try:  # an import guard: without llguidance, llama.cpp tiers fall back to its GBNF sampler
    import llguidance
    import llguidance.numpy
    import numpy as np

    _GUIDANCE_ERROR: str | None = None
except ImportError as exc:  # pragma: no cover - exercised only where llguidance is absent
    _GUIDANCE_ERROR = str(exc)

# Grammars differ per request only by their evidence ids and bounds: a few dozen cover a pack.
_CACHED_GRAMMARS = 64


def require_guidance() -> None:
    if _GUIDANCE_ERROR is not None:
        raise EngineMissingError(
            f"llguidance is not installed ({_GUIDANCE_ERROR}); install it or set the tier's "
            "grammar_engine to 'llama_cpp'"
        )


def llama_cpp_tokenizer(vocab: Any) -> Any:
    """llguidance's tokenizer for a llama.cpp model, read from the GGUF's own vocabulary."""
    from llguidance.llamacpp import lltokenizer_from_vocab  # imports llama_cpp: not at load

    return lltokenizer_from_vocab(vocab)


class GrammarCompiler:
    """Matchers for GBNF grammars over one tokenizer. Each grammar is compiled once; a request
    gets a copy of the compiled matcher in its start state."""

    def __init__(self, tokenizer: Any) -> None:
        require_guidance()
        self.tokenizer = tokenizer
        self._compiled: OrderedDict[str, Any] = OrderedDict()

    def matcher(self, gbnf: str) -> Any:
        pristine = self._compiled.get(gbnf)
        if pristine is None:
            pristine = llguidance.LLMatcher(self.tokenizer, llguidance.grammar_from("gbnf", gbnf))
            if pristine.is_error():
                raise BackendError(f"llguidance cannot use the grammar: {pristine.get_error()}")
            self._compiled[gbnf] = pristine
            if len(self._compiled) > _CACHED_GRAMMARS:
                self._compiled.popitem(last=False)
        else:
            self._compiled.move_to_end(gbnf)
        return pristine.deep_copy()

    def clear(self) -> None:
        self._compiled.clear()


class TokenMask:
    """One generation's grammar state: advanced with every token the engine accepts, asked for
    the tokens allowed next. A token the grammar rejects is recorded in `error`; from then on
    only end-of-sequence is allowed, so generation ends and the caller fails closed."""

    def __init__(self, matcher: Any, n_vocab: int, eos: int) -> None:
        self.matcher = matcher
        self.error: str | None = None
        self._n_vocab = n_vocab
        self._eos = eos
        self._words = llguidance.numpy.allocate_token_bitmask(1, n_vocab)

    def consume(self, token: int) -> bool:
        if self.error is None and not self.matcher.consume_token(token):
            self.error = f"the grammar rejected token {token}: {self.matcher.get_error()}"
        return self.error is None

    def words(self) -> Any:
        """The allowed tokens as llguidance's bitmask: int32 words, bit i of word w allowing
        token 32 w + i."""
        if self.error is None:
            llguidance.numpy.fill_next_token_bitmask(self.matcher, self._words)
            if self.matcher.is_error():
                self.error = f"the grammar failed: {self.matcher.get_error()}"
        if self.error is not None:
            self._words[:] = 0
            self._words[0, self._eos // 32] = np.int32(1 << (self._eos % 32)).item()
        return self._words

    def allowed(self, width: int) -> Any:
        """A boolean array over `width` token ids (the logits' width, which may pad the
        vocabulary)."""
        bits = np.unpackbits(self.words().view(np.uint8), bitorder="little")
        if bits.shape[0] >= width:
            return bits[:width].astype(bool)
        return np.concatenate([bits, np.zeros(width - bits.shape[0], np.uint8)]).astype(bool)

    def apply(self, logits: Any) -> Any:
        """Disallowed tokens' logits to -inf, in place; returns the array."""
        logits[~self.allowed(logits.shape[-1])] = -np.inf
        return logits


class GuidanceLogitsProcessor:
    """A llama-cpp-python logits processor: `(input_ids, scores) -> scores`.

    llama-cpp-python passes the ids evaluated so far; those past the prompt are the tokens it
    accepted, so the matcher is advanced with each before the next mask is computed. Run it
    after any processor that forces a token, so that its mask is the last word."""

    def __init__(self, mask: TokenMask) -> None:
        self.mask = mask
        self._start: int | None = None  # where the generated tokens begin in input_ids
        self._consumed = 0

    def __call__(self, input_ids: Any, scores: Any) -> Any:
        if self._start is None:
            self._start = len(input_ids)
        for token in input_ids[self._start + self._consumed :]:
            self._consumed += 1
            if not self.mask.consume(int(token)):
                break
        return self.mask.apply(scores)
