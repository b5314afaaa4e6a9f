"""Streaming doom-loop detection for token-by-token LLM output.

Small models under a JSON grammar fall into loops: the same sentence or JSON value again and
again, periodic token cycles, endless whitespace or punctuation. `LoopDetector` is fed every
token as it is decoded and reports the first loop it sees, so the caller can stop generation.
All state is incremental and bounded: a token costs O(max_period) plus O(1) per character.
"""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum

_PUNCT_PATTERN_MAX = 8  # longer symbol-only patterns are rare enough to ignore
_TRACKED_MAX = 4096  # distinct sentences/values remembered; bounds memory on long outputs
_SPAN_MAX = 512  # longer sentences/strings are not counted: runaway text is the chunk detector's
_DEPTH_MAX = 256  # deeper JSON nesting is not tracked (a grammar would not produce it anyway)


@dataclass(frozen=True)
class LoopSettings:
    """Thresholds for `LoopDetector`; defaults suit short JSON verdicts from sub-1B models."""

    # A period above 64 tokens needs 192+ tokens before it could fire; by then the chunk and
    # sentence detectors have caught any realistic loop, and each period costs time per token.
    max_period: int = 64
    # Two copies in a row happen in real text ("no, no"); a third one rarely does.
    min_repeats: int = 3
    # Short periodic runs are legitimate (the zeros of 1000000, "..."), so a loop must span
    # at least this many tokens.
    min_loop_tokens: int = 12
    # gemini-cli's LoopDetectionService hashes 50-character chunks.
    chunk_size: int = 50
    # gemini-cli waits for 10 copies in long chat answers; our answers are a few hundred
    # tokens, so 5 close copies already mean the output is stuck.
    chunk_repeats: int = 5
    # Largest distance in characters from the first to the last of those copies: gemini-cli's
    # "average gap <= 1.5 * chunk_size" over 4 gaps is 4 * 75 = 300.
    chunk_window: int = 300
    # JSON allows free whitespace and pretty-printing indents ~40 columns at most; 64 blank
    # characters in a row carry nothing.
    max_whitespace_run: int = 64
    # No real answer has 48 punctuation characters in a row repeating a pattern of <= 8
    # (deeply nested closers are ~10); "!!!!", "....", '"", "", ' loops reach it fast.
    max_punct_run: int = 48
    # The Gemma-270m failure mode says the same sentence over and over; two copies can be
    # emphasis, three are a loop.
    sentence_repeats: int = 3
    # Same reasoning for JSON string values, e.g. an evidence list with one item repeated.
    value_repeats: int = 3
    # "Yes." or "No." legitimately recur; sentences (and object values) shorter than this
    # are not counted.
    min_sentence_chars: int = 12
    # Counting loops ("Step 1: Step 2: ...", "2018, 2019, 2020, ...", "- 1.\n- 2.\n"): the
    # same block with only its number changing. Numbers are masked inside one string or prose
    # stretch; ids in separate JSON strings (["rule-001", "rule-002"]) never meet. Six copies:
    # a sentence may list five numbers ("steps 1, 2, 3, 4 and 5").
    count_max_period: int = 48
    count_repeats: int = 6
    enabled: bool = True

    def __post_init__(self) -> None:
        minimum = {
            "min_repeats": 2,
            "chunk_repeats": 2,
            "sentence_repeats": 2,
            "value_repeats": 2,
            "chunk_window": 0,
        }
        for field in fields(self):
            value = getattr(self, field.name)
            if field.name != "enabled" and value < minimum.get(field.name, 1):
                raise ValueError(f"LoopSettings.{field.name} is too small: {value}")


class LoopKind(StrEnum):
    """Which detector fired."""

    PERIODIC_TOKENS = "periodic_tokens"
    REPEATED_CHUNK = "repeated_chunk"
    WHITESPACE_RUN = "whitespace_run"
    PUNCTUATION_RUN = "punctuation_run"
    REPEATED_SENTENCE = "repeated_sentence"
    REPEATED_VALUE = "repeated_value"
    COUNTING = "counting"


@dataclass(frozen=True)
class LoopVerdict:
    """A detected loop: `period` is in tokens for periodic loops, in characters otherwise;
    `at_token` is the 0-based index of the token whose arrival triggered it."""

    kind: LoopKind
    period: int
    at_token: int
    detail: str


def _clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."


def _bump(counts: dict[str, int], key: str) -> int:
    n = counts.get(key, 0) + 1
    if n == 1 and len(counts) >= _TRACKED_MAX:
        # Loops are local, so the oldest entries (dicts keep insertion order) matter least.
        for old in list(counts)[: _TRACKED_MAX // 2]:
            del counts[old]
    counts[key] = n
    return n


class LoopDetector:
    """Incremental doom-loop detector: call `feed` once per generated token."""

    def __init__(self, settings: LoopSettings | None = None) -> None:
        self.settings = settings if settings is not None else LoopSettings()
        s = self.settings
        # Precomputed: feed() is on the decode hot path.
        self._need = [0] + [
            max(p * (s.min_repeats - 1), s.min_loop_tokens - p, 1)
            for p in range(1, s.max_period + 1)
        ]
        self.reset()

    @property
    def verdict(self) -> LoopVerdict | None:
        """The loop found so far, if any."""
        return self._verdict

    @property
    def tokens_seen(self) -> int:
        """How many tokens have been fed since construction or the last `reset`."""
        return self._tokens

    def reset(self) -> None:
        """Forget everything, ready for a new generation."""
        self._verdict: LoopVerdict | None = None
        self._tokens = 0
        # periodic tokens
        self._ids: list[int] = []
        self._texts: list[str] = []
        self._runs = [0] * (self.settings.max_period + 1)
        self._symbolic_run = 0  # consecutive tokens with text but no letter or digit
        self._alnum_token = -1  # index of the last token with a letter or digit
        # chunks, over content characters only (see _scan)
        self._content = ""  # tail of the content, enough to cut the latest chunk from
        self._content_chars = 0
        self._content_alnum = 0  # 1-based position of the last letter or digit in the content
        self._chunks: dict[str, list[int]] = {}  # chunk -> end positions of its latest copies
        self._next_prune = 0
        self._ws_run = 0
        self._punct: list[str] = []
        self._punct_runs = [0] * (_PUNCT_PATTERN_MAX + 1)
        # JSON lexer
        self._in_string = False
        self._escape = False
        self._string: list[str] = []
        self._string_is_key = False
        self._stack: list[str] = []
        self._expect_key = False
        self._values: dict[str, int] = {}
        # sentences
        self._sentence: list[str] = []
        self._dot_pending = False
        self._sentences: dict[str, int] = {}
        # counting loops, over content characters with digit runs masked as "#"
        self._masked: list[str] = []
        self._raw: list[str] = []  # what each masked character stands for
        self._count_runs = [0] * (self.settings.count_max_period + 1)
        self._prev_digit = False

    def feed(self, token_id: int, text: str) -> LoopVerdict | None:
        """Feed one generated token (its id and its decoded text piece, which may be empty
        or a partial UTF-8 char replaced by ''). Returns a verdict the first time a loop is
        detected, and the same verdict on every later call; None otherwise."""
        index = self._tokens
        self._tokens += 1
        if self._verdict is None and self.settings.enabled:
            verdict = self._scan(index, text) if text else None
            if verdict is None:
                symbolic = bool(text) and self._alnum_token != index
                verdict = self._periodic(index, token_id, text, symbolic)
            self._verdict = verdict
        return self._verdict

    def _periodic(self, index: int, token_id: int, text: str, symbolic: bool) -> LoopVerdict | None:
        s = self.settings
        ids, runs, need = self._ids, self._runs, self._need
        self._symbolic_run = self._symbolic_run + 1 if symbolic else 0
        hit = 0
        for p in range(1, min(len(ids), s.max_period) + 1):
            if ids[-p] == token_id:
                run = runs[p] + 1
                runs[p] = run
                # Symbol-only blocks (indentation, "!!!") belong to the run detectors, whose
                # thresholds are meant for them.
                if run >= need[p] and self._symbolic_run < p:
                    hit = p
                    break
            else:
                runs[p] = 0
        ids.append(token_id)
        self._texts.append(text)
        if len(ids) > 2 * s.max_period:
            del ids[: -s.max_period], self._texts[: -s.max_period]
        if not hit:
            return None
        block = "".join(self._texts[-hit:])
        copies = (runs[hit] + hit) // hit
        return LoopVerdict(
            LoopKind.PERIODIC_TOKENS,
            hit,
            index,
            f"block of {hit} tokens {_clip(block)!r} x{copies}",
        )

    def _scan(self, index: int, text: str) -> LoopVerdict | None:
        s = self.settings
        for c in text:
            if c.isspace():
                self._ws_run += 1
                if self._ws_run >= s.max_whitespace_run:
                    return LoopVerdict(
                        LoopKind.WHITESPACE_RUN,
                        1,
                        index,
                        f"{self._ws_run} whitespace characters in a row",
                    )
            else:
                self._ws_run = 0
                if c.isalnum():
                    self._alnum_token = index
                    if self._punct:
                        self._punct.clear()
                        self._punct_runs = [0] * (_PUNCT_PATTERN_MAX + 1)
                else:
                    verdict = self._punctuation(index, c)
                    if verdict is not None:
                        return verdict
            # Content is string values and top-level prose. JSON structure and keys are left
            # out: a list of same-shaped objects repeats long stretches of them legitimately.
            if self._in_string:
                content = not self._string_is_key and (self._escape or c != '"')
            else:
                content = not self._stack and c not in '"{['
            verdict = self._lex(index, c)
            if verdict is None and content:
                verdict = self._chunk(index, c) or self._counting(index, c)
            elif not content and self._masked:
                self._masked.clear()
                self._raw.clear()
                self._prev_digit = False  # a string ended: ids in separate strings never meet
                self._count_runs = [0] * (s.count_max_period + 1)
            if verdict is not None:
                return verdict
        return None

    def _counting(self, index: int, c: str) -> LoopVerdict | None:
        masked, raw, runs = self._masked, self._raw, self._count_runs
        if c.isdigit() and self._prev_digit and raw:
            raw[-1] += c  # one "#" per number, so 9 -> 10 keeps the period
            return None
        self._prev_digit = c.isdigit()
        m = "#" if self._prev_digit else c
        s = self.settings
        hit = 0
        for p in range(2, min(len(masked), s.count_max_period) + 1):
            if masked[-p] == m:
                runs[p] += 1
                # a number must change: an unchanged block is the periodic detector's
                if (
                    runs[p] >= p * (s.count_repeats - 1)
                    and "#" in masked[-p:]
                    and raw[-p:] != raw[-2 * p : -p]
                ):
                    hit = p
                    break
            else:
                runs[p] = 0
        masked.append(m)
        raw.append(c)
        if len(masked) > 2 * s.count_max_period:
            del masked[: -s.count_max_period], raw[: -s.count_max_period]
        if not hit:
            return None
        block = "".join(masked[-hit:])
        return LoopVerdict(
            LoopKind.COUNTING,
            hit,
            index,
            f"block {_clip(block)!r} with a changing number x{s.count_repeats}",
        )

    def _chunk(self, index: int, c: str) -> LoopVerdict | None:
        s = self.settings
        size = s.chunk_size
        self._content += c
        n = self._content_chars = self._content_chars + 1
        if c.isalnum():
            self._content_alnum = n
        if len(self._content) > 4 * size:
            self._content = self._content[-size:]
        if n >= self._next_prune:
            self._chunks = {k: v for k, v in self._chunks.items() if v[-1] >= n - s.chunk_window}
            self._next_prune = n + max(s.chunk_window, 256)
        # Chunks without a letter or digit are runs, left to the run detectors.
        if n < size or self._content_alnum <= n - size:
            return None
        chunk = self._content[-size:]
        # Keyed by the text itself, so a hash hit is confirmed by string equality.
        seen = self._chunks.get(chunk)
        if seen is None:
            self._chunks[chunk] = [n]
            return None
        seen.append(n)
        if len(seen) > s.chunk_repeats:
            del seen[0]
        span = n - seen[0]
        if len(seen) < s.chunk_repeats or span > s.chunk_window:
            return None
        return LoopVerdict(
            LoopKind.REPEATED_CHUNK,
            span // (s.chunk_repeats - 1),
            index,
            f"chunk {_clip(chunk)!r} x{len(seen)} within {span} chars",
        )

    def _punctuation(self, index: int, c: str) -> LoopVerdict | None:
        # Whitespace neither breaks nor extends a run, so ", , , ," counts like ",,,,".
        recent, runs = self._punct, self._punct_runs
        hit = 0
        for p in range(1, len(recent) + 1):
            if recent[-p] == c:
                runs[p] += 1
                if not hit and runs[p] + p >= self.settings.max_punct_run:
                    hit = p
            else:
                runs[p] = 0
        recent.append(c)
        if len(recent) > _PUNCT_PATTERN_MAX:
            del recent[0]
        if not hit:
            return None
        pattern = "".join(recent[-hit:])
        return LoopVerdict(
            LoopKind.PUNCTUATION_RUN,
            hit,
            index,
            f"{runs[hit] + hit} punctuation characters repeating {pattern!r}",
        )

    def _lex(self, index: int, c: str) -> LoopVerdict | None:
        """Track JSON strings and containers, and feed sentence text."""
        if self._in_string:
            if self._escape:
                self._escape = False
                if len(self._string) < _SPAN_MAX:
                    self._string.append(c)
                if c == "n":  # an escaped newline ends a sentence like a real one
                    return self._sentence_char(index, "\n")
                return self._sentence_char(index, " " if c in "rt" else c)
            if c == '"':
                self._in_string = False
                self._sentence.clear()
                self._dot_pending = False
                return self._end_string(index)
            if len(self._string) < _SPAN_MAX:
                self._string.append(c)
            if c == "\\":
                self._escape = True
                return None
            return self._sentence_char(index, c)
        stack = self._stack
        if c == '"':
            self._in_string = True
            self._string_is_key = self._expect_key and bool(stack) and stack[-1] == "{"
            self._string.clear()
            # A quote starts new text; what came before (keys, commas) is not a sentence.
            self._sentence.clear()
            self._dot_pending = False
            return None
        if c in "{[":
            if len(stack) < _DEPTH_MAX:
                stack.append(c)
            self._expect_key = c == "{"
        elif c in "}]":
            if stack:
                stack.pop()
            self._expect_key = False
        elif c == ",":
            self._expect_key = bool(stack) and stack[-1] == "{"
        elif c == ":":
            self._expect_key = False
        return self._sentence_char(index, c)

    def _end_string(self, index: int) -> LoopVerdict | None:
        if self._string_is_key or len(self._string) >= _SPAN_MAX:
            return None
        value = "".join(self._string)
        # Array items may be short ("R1 applies"); values of object members are held to the
        # sentence minimum because enums like "high" legitimately recur across fields.
        in_array = bool(self._stack) and self._stack[-1] == "["
        if len(value) < (3 if in_array else self.settings.min_sentence_chars):
            return None
        n = _bump(self._values, value)
        if n < self.settings.value_repeats:
            return None
        return LoopVerdict(
            LoopKind.REPEATED_VALUE, len(value), index, f'value "{_clip(value)}" x{n}'
        )

    def _sentence_char(self, index: int, c: str) -> LoopVerdict | None:
        sentence = self._sentence
        if self._dot_pending:
            # "0.92" is a number, not the end of a sentence.
            self._dot_pending = False
            if not c.isdigit():
                verdict = self._end_sentence(index)
                if verdict is not None:
                    return verdict
        if c == "\n":
            return self._end_sentence(index)
        if len(sentence) < _SPAN_MAX:
            sentence.append(c)
        if c == "." and len(sentence) >= 2 and sentence[-2].isdigit():
            self._dot_pending = True
        elif c in ".!?":
            return self._end_sentence(index)
        return None

    def _end_sentence(self, index: int) -> LoopVerdict | None:
        overflowed = len(self._sentence) >= _SPAN_MAX
        raw = "".join(self._sentence).strip()
        self._sentence.clear()
        key = " ".join(raw.split()).lower().rstrip(".!? ")
        if overflowed or len(key) < self.settings.min_sentence_chars:
            return None
        n = _bump(self._sentences, key)
        if n < self.settings.sentence_repeats:
            return None
        return LoopVerdict(
            LoopKind.REPEATED_SENTENCE, len(key), index, f'sentence "{_clip(raw)}" x{n}'
        )
