"""The text loops of `LoopDetector`: a JSON lexer that follows strings and containers, and
the sentences, string values and near copies (paraphrases) it finds in them.

`TextLoops` is the detector's base: `LoopDetector._scan` calls `_lex` once per character and
reads the lexer's state (`_in_string`, `_escape`, `_string_is_key`, `_stack`) to tell content
from JSON structure, so the state lives on the detector itself, with no indirection per
character."""

from __future__ import annotations

import re

from service.guards.loops.settings import LoopKind, LoopSettings, LoopVerdict, clip

_TRACKED_MAX = 4096  # distinct sentences/values remembered; bounds memory on long outputs
_SPAN_MAX = 512  # longer sentences/strings are not counted: runaway text is the chunk detector's
_DEPTH_MAX = 256  # deeper JSON nesting is not tracked (a grammar would not produce it anyway)
_SENTENCE_END = ".!?\u3002\uff01\uff1f"  # with the CJK full stop, exclamation, question marks
_DIGITS = re.compile(r"\d+")
_STRIP = ".,;:!?\"'()[]{}<>*`\u3002\uff0c\uff01\uff1f"  # around a word, not part of it
_IN_WORD = "/_-=@:%&#~+"  # after ".", "?" or "!": a URL, a path or an address goes on


def _wordlike(word: str) -> bool:
    """A word a paraphrase could swap: no digit, not a path, an address or an identifier."""
    return not any(c.isdigit() or c in "/_=@:\\" for c in word)


def _own_word(c: str) -> bool:
    """Scripts written without spaces (CJK, kana, Thai): every letter is a word of its own."""
    o = ord(c)
    return 0x2E80 <= o <= 0x9FFF or 0xF900 <= o <= 0xFAFF or 0x0E00 <= o <= 0x0E7F


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


class TextLoops:
    """Repeated sentences, repeated JSON values and paraphrases, fed one character at a time
    by `_lex`; the base of `LoopDetector`, which owns the settings."""

    settings: LoopSettings

    def _reset_text(self) -> None:
        """Forget the lexer, the sentences, the values and the near copies (for `reset`)."""
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
            LoopKind.REPEATED_VALUE, len(value), index, f'value "{clip(value)}" x{n}'
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
            f"third near copy of {clip(sentence)!r}, {agreed} words in",
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
            LoopKind.REPEATED_SENTENCE, len(key), index, f'sentence "{clip(raw)}" x{n}'
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
