"""Streaming doom-loop detection for token-by-token LLM output.

Small models under a JSON grammar fall into loops: the same sentence or JSON value again and
again, periodic token cycles, endless whitespace or punctuation. `LoopDetector` is fed every
token as it is decoded and reports the first loop it sees, so the caller can stop generation.
All state is incremental and bounded: a token costs O(max_period) plus O(1) per character.
"""

from __future__ import annotations

import itertools
import re
from dataclasses import dataclass, fields
from enum import StrEnum

_PUNCT_PATTERN_MAX = 8  # longer symbol-only patterns are rare enough to ignore
_TRACKED_MAX = 4096  # distinct sentences/values remembered; bounds memory on long outputs
_SPAN_MAX = 512  # longer sentences/strings are not counted: runaway text is the chunk detector's
_DEPTH_MAX = 256  # deeper JSON nesting is not tracked (a grammar would not produce it anyway)
_QGRAM = 8  # masked characters that must match before a counting period is tried
_CANDIDATES_MAX = 16  # counting periods followed at once
_SENTENCE_END = ".!?\u3002\uff01\uff1f"  # with the CJK full stop, exclamation, question marks
_DIGITS = re.compile(r"\d+")
_WORD_JOINERS = "_-"
_STRIP = ".,;:!?\"'()[]{}<>*`\u3002\uff0c\uff01\uff1f"  # around a word, not part of it
_IN_WORD = "/_-=@:%&#~+"  # after ".", "?" or "!": a URL, a path or an address goes on  # inside identifiers, UUIDs and base64-ish runs


def _wordlike(word: str) -> bool:
    """A word a paraphrase could swap: no digit, not a path, an address or an identifier."""
    return not any(c.isdigit() or c in "/_=@:\\" for c in word)


def _own_word(c: str) -> bool:
    """Scripts written without spaces (CJK, kana, Thai): every letter is a word of its own."""
    o = ord(c)
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x0E00 <= o <= 0x0E7F


@dataclass(frozen=True)
class LoopSettings:
    """Thresholds for `LoopDetector`; defaults suit short JSON verdicts from sub-1B models."""

    # The window: the longest token block the periodic detector compares. A block longer than
    # `early_tokens` fires once its third copy has run that many tokens, so a 128-token
    # sentence is stopped 144 tokens after its second copy began, not at 384 tokens.
    max_period: int = 128
    # Two copies in a row happen in real text ("no, no"); a third one rarely does.
    min_repeats: int = 3
    # Short periodic runs are legitimate: the zeros of 1000000, "...", and what tools print
    # (a 19-digit number, a card number "4444 4444 4444 4444", `uname` saying "x86_64" three
    # times: 12 to 21 tokens, with the blanks around them). A loop must span at least this
    # many tokens; a real one goes on, so a short unit still fires within 24 tokens of its
    # start.
    min_loop_tokens: int = 24
    # Tokens of the third copy a long block needs: two copies and 16 more tokens of the same
    # text almost never happen in prose, and waiting for the whole third copy of a long block
    # costs up to max_period tokens.
    early_tokens: int = 16
    # Symbol-only blocks ("!!!!", "\n\n", "-.-.") are the run detectors' (counted in
    # characters), but a tokeniser that spends one token per mark would take 48 tokens to
    # reach them; a periodic symbol-only stretch of this many tokens is a loop too.
    symbolic_tokens: int = 32
    # A word (letters, digits, "_" or "-") this long with both letters and digits, or twice
    # as long, is a hash, an address, a UUID or base64: its tokens never fire as periodic.
    # Digits alone are a number, however long, and "1000000000000000..." is Gemma-270m
    # looping (20 digits and more: see min_loop_tokens).
    opaque_chars: int = 12
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
    max_punct_run: int = 96
    # The Gemma-270m failure mode says the same sentence over and over; two copies can be
    # emphasis, three are a loop.
    sentence_repeats: int = 3
    # Same reasoning for JSON string values, e.g. an evidence list with one item repeated.
    value_repeats: int = 3
    # Copies count when they come close: within this many sentences or values of the last one
    # (a cycle of up to 2). A list that names one rule in its 1st, 9th and 20th line is not a
    # loop, and neither is a page or a log that prints one line between different ones (a
    # web page's "<::before><::after>", a shell's syntax error after each command): a line
    # without a full stop needs the same items between its copies (digits masked).
    repeat_gap: int = 2
    # "Yes." or "No." legitimately recur; sentences (and object values) shorter than this
    # are not counted.
    min_sentence_chars: int = 12
    # Counting loops ("Step 1: Step 2: ...", "2018, 2019, 2020, ...", "- 1.\n- 2.\n"): the
    # same text with only its numbers changing, compared in characters with every number
    # masked, up to this period. Numbers are masked inside one string or prose stretch; ids in
    # separate JSON strings (["rule-001", "rule-002"]) never meet.
    count_max_period: int = 512
    # Six copies of a short block: a sentence may list five numbers ("steps 1, 2, 3, 4 and 5").
    count_repeats: int = 6
    # ...but a long block fires once its third copy has run this many characters (about 16
    # tokens of prose), as the periodic detector does.
    count_early_chars: int = 64
    # Paraphrase loops: consecutive sentences of the same words but for one or two, where the
    # changed words move ("must not delete" -> "should not delete" -> "should not remove").
    # Lists change the same slot every time ("Let me check the logs / the config / the db")
    # and never fire. Sentences shorter than this are left to the exact detectors.
    near_min_words: int = 6
    # Words that may differ between two near copies: 2 (one word swapped back, one swapped
    # in), plus one per 12 words of a long sentence.
    near_changes: int = 2
    # The third near copy fires once this many of its words agree, not at its full stop.
    near_early_words: int = 10
    enabled: bool = True

    def __post_init__(self) -> None:
        minimum = {
            "min_repeats": 2,
            "chunk_repeats": 2,
            "sentence_repeats": 2,
            "value_repeats": 2,
            "chunk_window": 0,
            "near_changes": 0,
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
    PARAPHRASE = "paraphrase"


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


_Counts = dict[str, tuple[int, int, tuple[str, ...]]]  # key -> (copies, when, items between)


def _bump(counts: _Counts, key: str, now: int, recent: list[str], gap: int, cycle: bool) -> int:
    """Count one more copy of `key`, seen as the `now`-th item after the items `recent`
    (masked, the latest last). A copy more than `gap` items after the last one starts the
    count again (a loop repeats itself close by). With `cycle`, one with other items between
    it and the last than the last had before it counts as a second copy: a line of a
    listing comes back among different ones, a loop repeats its whole cycle."""
    last = counts.get(key)
    between: tuple[str, ...]
    if last is None or now - last[1] > gap:
        n, between = 1, ()
    else:
        between = tuple(recent[len(recent) - (now - 1 - last[1]) :])
        n = last[0] + 1 if not cycle or last[0] == 1 or last[2] == between else 2
    if last is None and len(counts) >= _TRACKED_MAX:
        # Loops are local, so the oldest entries (dicts keep insertion order) matter least.
        for old in list(counts)[: _TRACKED_MAX // 2]:
            del counts[old]
    counts[key] = (n, now, between)
    return n


class LoopDetector:
    """Incremental doom-loop detector: call `feed` once per generated token."""

    def __init__(self, settings: LoopSettings | None = None) -> None:
        self.settings = settings if settings is not None else LoopSettings()
        s = self.settings
        # Precomputed: feed() is on the decode hot path.
        self._need = [0] + [
            max(min(p * (s.min_repeats - 1), p + s.early_tokens), s.min_loop_tokens - p, 1)
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
        # the word being written, to tell hashes and addresses from loops
        self._word_chars = 0
        self._word_digit = False
        self._word_alpha = False
        self._opaque_token = -1  # index of the last token inside an opaque word
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
        self._values: _Counts = {}
        # sentences
        self._sentence: list[str] = []
        self._dot_pending = False
        self._sentences: _Counts = {}
        self._items = 0  # sentences and values counted so far, the clock of _bump
        self._recent: list[str] = []  # the latest of them, digits masked
        # near copies: the words of this sentence and the last, and where the last two differed
        self._word: list[str] = []
        self._words: list[str] = []
        self._prev_words: list[str] = []
        self._prev_diff: frozenset[int] | None = None
        self._diff: list[int] = []
        # counting loops, over content characters with every number masked as one "#"
        self._masked: list[str] = []
        self._numbers: list[str] = []  # the number each "#" of _masked stands for
        self._masked_at = 0  # absolute position of _masked[0]
        self._qgram = ""
        self._qgrams: dict[str, int] = {}  # q-gram -> absolute end of its latest copy
        self._count_runs: dict[int, int] = {}  # period -> characters matched at that lag
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
        # A token of a hash or an address never fires and never breaks a run: the digits of
        # "0x0000000000" or "9876543210abcdef9876543210abcdef" are not a loop, but a loop
        # that quotes one id keeps its period across it.
        if self._opaque_token == index:
            for p in range(1, min(len(ids), s.max_period) + 1):
                if ids[-p] == token_id:
                    runs[p] += 1
        else:
            for p in range(1, min(len(ids), s.max_period) + 1):
                if ids[-p] == token_id:
                    run = runs[p] + 1
                    runs[p] = run
                    # Symbol-only blocks (indentation, "!!!") belong to the run detectors,
                    # counted in characters, unless they run for many tokens.
                    if run >= need[p] and (
                        self._symbolic_run < p
                        or (
                            run + p >= s.symbolic_tokens
                            and not "".join(self._texts[-p:]).isspace()  # blanks: in chars
                        )
                    ):
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
        copies = (runs[hit] + hit) / hit
        return LoopVerdict(
            LoopKind.PERIODIC_TOKENS,
            hit,
            index,
            f"block of {hit} tokens {_clip(block)!r} x{copies:.3g}",
        )

    def _scan(self, index: int, text: str) -> LoopVerdict | None:
        s = self.settings
        for c in text:
            # Inside a JSON string, "\\n" is a blank and its backslash is nothing: blank lines
            # written as escapes are counted like real ones.
            escaped = self._escape and self._in_string
            if escaped and c in "nrt":
                blank = True
            elif c == "\\" and self._in_string and not self._escape:
                blank = None  # an escape starts: neither blank nor a mark
            else:
                blank = c.isspace()
            if (c.isalnum() and not escaped) or (c in _WORD_JOINERS and self._word_chars):
                self._word_chars += 1
                self._word_digit = self._word_digit or c.isdigit()
                self._word_alpha = self._word_alpha or c.isalpha()
                mixed = self._word_digit and self._word_alpha
                # digits alone are a number, never opaque (see opaque_chars)
                if self._word_alpha and self._word_chars >= s.opaque_chars * (1 if mixed else 2):
                    self._opaque_token = index
            else:
                self._word_chars = 0
                self._word_digit = self._word_alpha = False
            if blank:
                self._ws_run += 1
                if self._ws_run >= s.max_whitespace_run:
                    return LoopVerdict(
                        LoopKind.WHITESPACE_RUN,
                        1,
                        index,
                        f"{self._ws_run} whitespace characters in a row",
                    )
            elif blank is not None:
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
            nested = bool(self._stack)
            verdict = self._lex(index, c)
            if verdict is None and content:
                verdict = self._chunk(index, c, escaped) or self._counting(index, c)
            elif not content and self._masked and nested:
                # JSON structure between strings: ids in separate strings never meet (a quote
                # in top-level prose is just a mark)
                self._masked_at += len(self._masked)
                self._masked.clear()
                self._numbers.clear()
                self._qgram = ""
                self._count_runs.clear()
                self._prev_digit = False
            if verdict is not None:
                return verdict
        return None

    def _counting(self, index: int, c: str) -> LoopVerdict | None:
        # The digits of a hash or an identifier ("a1b2c3d4e5f6", "paper_towel_005") are text,
        # not a number: unmasked, a hash matches nothing and an id quoted in every copy of a
        # counting loop matches itself.
        digit = c.isdigit() and not (
            self._opaque_token == index and self._word_digit and self._word_alpha
        )
        if digit and self._prev_digit:
            self._numbers[-1] += c
            return None  # one "#" per number, so 9 -> 10 keeps the period
        self._prev_digit = digit
        s = self.settings
        masked, runs = self._masked, self._count_runs
        m = "#" if digit else c
        end = len(masked)  # index m will have
        hit = 0
        for lag in list(runs):
            if masked[end - lag] == m:
                runs[lag] += 1
            else:
                del runs[lag]
        masked.append(m)
        self._numbers.append(c if digit else "")
        pos = self._masked_at + end + 1  # absolute end of the q-gram ending here
        q = self._qgram = (self._qgram + m)[-_QGRAM:]
        if len(q) == _QGRAM:
            seen = self._qgrams.get(q)
            self._qgrams[q] = pos
            if seen is not None:
                lag = pos - seen
                if 1 < lag <= s.count_max_period and lag not in runs and lag <= end:
                    run = _QGRAM
                    # how far back this period already held
                    while run < end + 1 - lag and masked[end - run] == masked[end - run - lag]:
                        run += 1
                    if len(runs) >= _CANDIDATES_MAX:
                        del runs[min(runs, key=runs.__getitem__)]
                    runs[lag] = run
        for lag, run in runs.items():
            # One number counts; a list of bare numbers ("0.2" "1.0" "2.4") is data up to 10
            # copies.
            if (
                run >= lag + min(lag * (s.count_repeats - 2), s.count_early_chars)
                and self._one_number_counts(lag)
                and (any(ch.isalpha() for ch in masked[-lag:]) or run >= lag * 9)
            ):
                hit = lag
                break
        if len(masked) > 2 * s.count_max_period:
            cut = len(masked) - s.count_max_period
            del masked[:cut], self._numbers[:cut]
            self._masked_at += cut
            self._qgrams = {k: v for k, v in self._qgrams.items() if v > pos - s.count_max_period}
        if not hit:
            return None
        block = "".join(masked[-hit:])
        return LoopVerdict(
            LoopKind.COUNTING,
            hit,
            index,
            f"block {_clip(block)!r} with a changing number x{(runs[hit] + hit) / hit:.3g}",
        )

    def _one_number_counts(self, lag: int) -> bool:
        """Whether exactly one number differs between the last two periods: a counter, not
        the rows of a table ("$10,000 A + $10,000 B", "$11,000 A + $9,000 B")."""
        nums = self._numbers
        end = len(nums)
        changed = sum(nums[i] != nums[i - lag] for i in range(end - lag, end) if nums[i])
        return changed == 1

    def _chunk(self, index: int, c: str, escaped: bool) -> LoopVerdict | None:
        s = self.settings
        size = s.chunk_size
        self._content += c
        n = self._content_chars = self._content_chars + 1
        if c.isalnum() and not escaped:  # the "n" of "\\n" is a blank, not a letter
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
        # A loop comes back at a steady pace (paraphrases have their own detector); rows of a
        # listing that share a long prefix ("/workspace/project/src/...") come back at the
        # pace of their own lengths.
        gaps = [b - a for a, b in itertools.pairwise(seen)]
        if max(gaps) - min(gaps) > 2:
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
                # a value string ends its last sentence for near copies; a key is no text
                verdict = None
                if not self._stack:
                    # a quote in top-level prose: the sentence goes on ('the "Gold" set is')
                    return self._sentence_char(index, c) or self._end_string(index)
                if not self._string_is_key:
                    if self._dot_pending:  # '... not clear."' ends its sentence
                        verdict = self._end_sentence(index)
                    verdict = verdict or self._end_word(index) or self._end_near(index)
                self._drop_sentence()
                return verdict or self._end_string(index)
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
            if not stack:
                return self._sentence_char(index, c)
            # A quote starts new text; what came before (keys, commas) is not a sentence.
            self._drop_sentence()
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

    def _drop_sentence(self) -> None:
        self._sentence.clear()
        self._dot_pending = False
        self._word.clear()
        self._words.clear()
        self._diff.clear()

    def _end_string(self, index: int) -> LoopVerdict | None:
        if self._string_is_key or len(self._string) >= _SPAN_MAX:
            return None
        value = "".join(self._string)
        # Array items may be short ("R1 applies"); values of object members are held to the
        # sentence minimum because enums like "high" legitimately recur across fields.
        in_array = bool(self._stack) and self._stack[-1] == "["
        counted = len(value) >= (3 if in_array else self.settings.min_sentence_chars)
        n = self._item(self._values, value, value, counted)
        if n < self.settings.value_repeats:
            return None
        return LoopVerdict(
            LoopKind.REPEATED_VALUE, len(value), index, f'value "{_clip(value)}" x{n}'
        )

    def _sentence_char(self, index: int, c: str) -> LoopVerdict | None:
        sentence = self._sentence
        if self._dot_pending:
            # "0.92", "example.com", "files?dir=" and "e.g" go on; ". " or ".\n" end it.
            self._dot_pending = False
            if not (c.isalnum() or c in _IN_WORD):
                verdict = self._end_sentence(index)
                if verdict is not None:
                    return verdict
        if c == "\n":
            return self._end_sentence(index)
        if len(sentence) < _SPAN_MAX:
            sentence.append(c)
        # Words are what blanks separate: a path or an identifier is one word.
        if c.isspace() or _own_word(c):
            verdict = self._end_word(index)
            if verdict is not None:
                return verdict
            if not c.isspace():
                self._word.append(c)
                verdict = self._end_word(index)
                if verdict is not None:
                    return verdict
        elif len(self._word) < _SPAN_MAX:
            self._word.append(c)
        if c in ".!?":
            self._dot_pending = True
        elif c in _SENTENCE_END:
            return self._end_sentence(index)
        return None

    def _end_word(self, index: int) -> LoopVerdict | None:
        """Compare the word just ended with the same word of the last sentence; a third near
        copy fires as soon as enough of it agrees."""
        if not self._word:
            return None
        word = "".join(self._word).lower().strip(_STRIP)
        self._word.clear()
        if not word:
            return None
        words, prev = self._words, self._prev_words
        j = len(words)
        if len(words) < _SPAN_MAX:
            words.append(word)
        if j >= len(prev):
            return None
        if prev[j] != word:
            # paraphrases swap words; rows of a listing or a log change numbers
            self._diff.append(j if _wordlike(word) or _wordlike(prev[j]) else -1)
        s = self.settings
        prev_diff = self._prev_diff
        if prev_diff is None or j + 1 < s.near_early_words:
            return None
        if len(self._diff) > s.near_changes + len(prev) // 12:
            return None
        if -1 in self._diff:
            return None
        if j + 1 < 2 * s.near_early_words and (
            not self._diff or frozenset(self._diff) == frozenset(d for d in prev_diff if d <= j)
        ):
            # The same slot changes: a list, not a loop. But twice as many words in a row as
            # the last near copy are a loop whatever changes further on.
            return None
        return self._near_verdict(index, j + 1)

    def _near_verdict(self, index: int, agreed: int) -> LoopVerdict:
        sentence = " ".join(self._prev_words)
        return LoopVerdict(
            LoopKind.PARAPHRASE,
            len(sentence),
            index,
            f"third near copy of {_clip(sentence)!r}, {agreed} words in",
        )

    def _end_sentence(self, index: int) -> LoopVerdict | None:
        verdict = self._end_word(index)
        if verdict is not None:
            return verdict
        verdict = self._end_near(index)
        if verdict is not None:
            return verdict
        overflowed = len(self._sentence) >= _SPAN_MAX
        raw = "".join(self._sentence).strip()
        self._sentence.clear()
        key = " ".join(raw.split()).lower().rstrip(".!? ")
        if not key:
            return None
        # every sentence ticks the clock, the short ones too
        counted = not overflowed and len(key) >= self.settings.min_sentence_chars
        n = self._item(self._sentences, key, raw, counted)
        if n < self.settings.sentence_repeats:
            return None
        return LoopVerdict(
            LoopKind.REPEATED_SENTENCE, len(key), index, f'sentence "{_clip(raw)}" x{n}'
        )

    def _item(self, counts: _Counts, key: str, raw: str, counted: bool) -> int:
        """Tick the clock of sentences and values; the copies of `key` so far if `counted`.
        A sentence said again is a loop whatever comes between ("The policy is a policy
        action." under ever longer headings); a line without a full stop, a log's or a
        page's, must come back with its whole cycle."""
        gap = self.settings.repeat_gap
        self._items += 1
        cycle = raw[-1:] not in _SENTENCE_END
        n = _bump(counts, key, self._items, self._recent, gap, cycle) if counted else 0
        self._recent.append(_DIGITS.sub("#", key))
        del self._recent[:-gap]
        return n

    def _end_near(self, index: int) -> LoopVerdict | None:
        words, prev = self._words, self._prev_words
        if not words:
            return None
        s = self.settings
        diff: frozenset[int] | None = None
        changes = len(self._diff)
        if (
            s.near_min_words <= len(words) == len(prev)
            and 0 < changes <= s.near_changes + len(words) // 12
            and -1 not in self._diff
        ):
            diff = frozenset(self._diff)
        verdict = None
        if diff is not None and self._prev_diff is not None and diff != self._prev_diff:
            verdict = self._near_verdict(index, len(words))
        self._prev_words, self._words = words, prev
        self._words.clear()
        self._diff.clear()
        self._prev_diff = diff
        return verdict
