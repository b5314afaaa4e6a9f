"""`LoopDetector`: fed every generated token, it runs the token and character detectors here
(periodic token blocks, repeated chunks, whitespace and punctuation runs, counting loops) and
the text detectors of its base `TextLoops` (sentences, JSON values, paraphrases)."""

from __future__ import annotations

import itertools

from service.guards.loops.settings import LoopKind, LoopSettings, LoopVerdict, clip
from service.guards.loops.text import TextLoops

_PUNCT_PATTERN_MAX = 8  # longer symbol-only patterns are rare enough to ignore
_QGRAM = 8  # masked characters that must match before a counting period is tried
_CANDIDATES_MAX = 16  # counting periods followed at once
_WORD_JOINERS = "_-"  # inside identifiers, UUIDs and base64-ish runs


class LoopDetector(TextLoops):
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
        self._reset_text()
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
            f"block of {hit} tokens {clip(block)!r} x{copies:.3g}",
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
                    return self._whitespace_verdict(index)
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
                self._break_counting()
            if verdict is not None:
                return verdict
        return None

    def _whitespace_verdict(self, index: int) -> LoopVerdict:
        return LoopVerdict(
            LoopKind.WHITESPACE_RUN,
            1,
            index,
            f"{self._ws_run} whitespace characters in a row",
        )

    def _break_counting(self) -> None:
        """Start the counting detector afresh: what follows never matches what came before."""
        self._masked_at += len(self._masked)
        self._masked.clear()
        self._numbers.clear()
        self._qgram = ""
        self._count_runs.clear()
        self._prev_digit = False

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
            self._trim_masked(pos)
        return self._counting_verdict(index, hit) if hit else None

    def _trim_masked(self, pos: int) -> None:
        """Forget the masked text (and its q-grams) older than the longest counting period;
        `pos` is the absolute end of the latest character."""
        s, masked = self.settings, self._masked
        cut = len(masked) - s.count_max_period
        del masked[:cut], self._numbers[:cut]
        self._masked_at += cut
        self._qgrams = {k: v for k, v in self._qgrams.items() if v > pos - s.count_max_period}

    def _counting_verdict(self, index: int, hit: int) -> LoopVerdict:
        block = "".join(self._masked[-hit:])
        copies = (self._count_runs[hit] + hit) / hit
        return LoopVerdict(
            LoopKind.COUNTING,
            hit,
            index,
            f"block {clip(block)!r} with a changing number x{copies:.3g}",
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
            f"chunk {clip(chunk)!r} x{len(seen)} within {span} chars",
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
