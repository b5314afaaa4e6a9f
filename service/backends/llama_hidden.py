"""Reading hidden states out of llama.cpp: the eval callback that copies the residual stream
of chosen layers during a prefill, and the steps of one read (where the marks end, which
tokens are evaluated, how deep, and what comes back). `LlamaCppBackend.hidden_states` runs
these steps; this module holds no model of its own."""

from __future__ import annotations

import ctypes
from collections.abc import Callable
from dataclasses import dataclass, field
from functools import lru_cache
from typing import Any

from service.backends.base import HiddenStates
from service.errors import BackendError

try:  # an import guard: llama_cpp.py reports a missing engine
    import llama_cpp
    import numpy as np
    from llama_cpp import _internals as llama_internals
    from llama_cpp._ggml import libggml
except ImportError:  # pragma: no cover - exercised only where llama-cpp-python is absent
    pass

# the tokens of a prompt -> the position that ends each of the marks, found as
# `LlamaCppBackend._mark_positions` finds them
MarksAt = Callable[[list[int], tuple[str, ...]], list[int]]


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
class Capture:
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

    def copy_rows(self, ggml: Any, tensor: int, row: int, row_bytes: int) -> None:
        """Copy this batch's wanted rows of one layer output, and add its span rows to the sum."""
        rows = ggml.ggml_nbytes(tensor) // row_bytes
        first = self.start + self.seen.get(row, 0)
        self.seen[row] = self.seen.get(row, 0) + rows
        for j, pos in enumerate(self.positions):
            if first <= pos < first + rows:
                dst = self.out[row, j].ctypes.data
                ggml.ggml_backend_tensor_get(tensor, dst, (pos - first) * row_bytes, row_bytes)
        lo, hi = max(first, self.span[0]), min(first + rows, self.span[1])
        if lo < hi:  # the span's rows in this batch are contiguous: one copy, then a sum
            block = np.empty((hi - lo, self.out.shape[2]), np.float32)
            ggml.ggml_backend_tensor_get(
                tensor, block.ctypes.data, (lo - first) * row_bytes, (hi - lo) * row_bytes
            )
            self.span_sum[row] += block.sum(axis=0)


def install_eval_callback(llm: Any, armed: Callable[[], Capture | None]) -> tuple[Any, Any]:
    """Rebuild `llm`'s context with an eval callback (llama.cpp takes it only at creation)
    that fills the capture `armed()` returns, and does nothing while it returns None. Gives
    the callback, which must be kept alive as long as the context, and the new context."""
    ggml = _ggml()
    row_bytes = 4 * llm.n_embd()

    def on_tensor(tensor: int, ask: bool, _data: Any) -> bool:
        capture = armed()
        if capture is None:
            return False  # unarmed: the whole graph runs as one piece
        row = capture.names.get(ggml.ggml_get_name(tensor))
        if ask or row is None:
            return row is not None
        capture.copy_rows(ggml, tensor, row, row_bytes)
        # False ends the graph's computation here: the blocks above are skipped
        return row != capture.stop_row

    eval_cb = llama_cpp.ggml_backend_sched_eval_callback(on_tensor)
    params = llm.context_params
    params.cb_eval = eval_cb
    params.cb_eval_user_data = None
    ctx = llama_internals.LlamaContext(model=llm._model, params=params, verbose=False)
    old, llm._ctx = llm._ctx, ctx
    old.close()
    return eval_cb, ctx


def mark_positions(
    tokens: list[int], marks: tuple[str, ...], piece: Callable[[int], bytes]
) -> list[int]:
    """The token position that ends each mark (at least one), the marks being found in order
    at the end of the prompt (after the last occurrence of the first one); `piece` gives a
    token's bytes, special tokens as their text."""
    ends: list[int] = []  # byte offset, from the start of `tail`, where each token ends
    tail = b""
    for token in reversed(tokens):
        tail = piece(token) + tail
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


def cached_prefix(llm: Any, tokens: list[int]) -> int:
    """How many of `tokens` lead the KV cache already."""
    cached = 0
    for have, want in zip(llm._input_ids[: llm.n_tokens], tokens, strict=False):
        if have != want:
            break
        cached += 1
    return cached


@dataclass(frozen=True)
class HiddenRead:
    """Which tokens one hidden-state read evaluates, and where it reads them."""

    tokens: list[int]  # the prompt, cut after `until`
    positions: list[int]  # the end of each mark, then the last token
    span: tuple[int, int]  # [first, end) token positions to average; (0, 0): none
    cached: int  # tokens kept from the KV cache: the first one evaluated
    deep: int  # tokens before this go through the whole network, the rest only to a layer


def plan_read(
    llm: Any,
    tokens: list[int],
    marks_at: MarksAt,
    *,
    marks: tuple[str, ...],
    span: tuple[str, str | None] | None,
    until: str | None,
    shallow_after: str | None,
    choices: tuple[str, ...],
) -> HiddenRead:
    """The read that `LlamaCppBackend.hidden_states` describes, on the prompt's `tokens`."""
    if until is not None:
        (stop,) = marks_at(tokens, (until,))
        tokens = tokens[: stop + 1]
    spanned = (0, 0)
    if span is not None:
        opened, *closed = marks_at(tokens, tuple(m for m in span if m))
        spanned = (opened + 1, (closed or [len(tokens) - 1])[0] + 1)
    positions = [*marks_at(tokens, marks), len(tokens) - 1]
    cached = cached_prefix(llm, tokens)
    # every wanted position is evaluated again
    cached = min(cached, *positions, *([spanned[0]] if span is not None else []))
    deep = len(tokens)
    if shallow_after is not None:
        if choices:
            raise BackendError("a shallow read has no logits to read choices from")
        (end,) = marks_at(tokens, (shallow_after,))
        deep = max(cached, end + 1)
    return HiddenRead(tokens, positions, spanned, cached, deep)


def capture_for(llm: Any, read: HiddenRead, layers: tuple[int, ...]) -> Capture:
    """An unarmed capture of `layers` at the read's positions and span."""
    return Capture(
        names={f"l_out-{layer}".encode(): k for k, layer in enumerate(layers)},
        positions=read.positions,
        start=read.cached,
        n_embd=llm.n_embd(),
        span=read.span,
    )


def choice_probs(llm: Any, table: dict[str, list[int]]) -> dict[str, float]:
    """Each word's probability as the next token, from the last evaluated token's logits."""
    logits = np.ctypeslib.as_array(llm._ctx.get_logits_ith(-1), shape=(llm.n_vocab(),))
    p = np.exp(logits - logits.max())
    total = float(p.sum())
    return {word: float(p[ids].sum()) / total for word, ids in table.items()}


def hidden_states_of(
    capture: Capture,
    read: HiddenRead,
    layers: tuple[int, ...],
    prefill_s: float,
    probs: dict[str, float],
) -> HiddenStates:
    """What a filled capture read, as the backend's answer."""
    spanned = read.span
    return HiddenStates(
        layers=layers,
        last=capture.out[:, -1, :].copy(),
        marks=capture.out[:, :-1, :].copy(),
        span_mean=(
            (capture.span_sum / (spanned[1] - spanned[0])).astype(np.float32)
            if spanned[1] > spanned[0]
            else None
        ),
        prompt_tokens=len(read.tokens),
        cached_tokens=read.cached,
        prefill_s=prefill_s,
        choice_probs=probs,
    )
