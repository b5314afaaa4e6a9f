"""The thresholds of the doom-loop detector, and what it reports when one is crossed."""

from __future__ import annotations

from dataclasses import dataclass, fields
from enum import StrEnum


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


def clip(text: str, limit: int = 60) -> str:
    return text if len(text) <= limit else text[: limit - 3] + "..."
