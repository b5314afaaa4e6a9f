from __future__ import annotations

import json
import math
import random
import re
import string
from typing import Any

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from service.guards.loops import LoopDetector, LoopKind, LoopSettings, LoopVerdict

WORDS = r"\w+|[^\w\s]|\s"  # words, single punctuation marks, single whitespace characters
BPE_LIKE = r" ?\w+| ?[^\w\s]|\s"  # words and marks carry their leading space, like " The"
DIGITS = r"\d|[^\W\d]+|[^\w\s]|\s"  # llama-style: every digit its own token
THREES = r".{1,3}"  # fixed 3-character pieces, blind to word boundaries

ANSWER = {
    "decision": "deny",
    "confidence": 0.92,
    "evidence": ["R1", "R2", "R7"],
    "rationale": "The agent is about to run rm -rf on the home directory without "
    "confirmation; rule R1 forbids destructive commands without consent.",
}
GEMMA = "The policy is not clear. The policy is not clear. The policy is not clear. "


class Tokenizer:
    """Splits text with a regex and gives each distinct piece a stable id."""

    def __init__(self) -> None:
        self.vocab: dict[str, int] = {}

    def __call__(self, text: str, pattern: str = WORDS) -> list[tuple[int, str]]:
        pieces = re.findall(pattern, text, flags=re.DOTALL)
        assert "".join(pieces) == text
        return [(self.vocab.setdefault(p, len(self.vocab)), p) for p in pieces]


def run(
    tokens: list[tuple[int, str]],
    loop_settings: LoopSettings | None = None,
) -> LoopVerdict | None:
    """Feed every token; return the first verdict, checking it sticks afterwards."""
    detector = LoopDetector(loop_settings)
    first: LoopVerdict | None = None
    for index, (token_id, piece) in enumerate(tokens):
        verdict = detector.feed(token_id, piece)
        if first is None and verdict is not None:
            first = verdict
            assert verdict.at_token == index
        assert verdict is first
    assert detector.tokens_seen == len(tokens)
    assert detector.verdict is first
    return first


def scan(
    text: str,
    pattern: str = WORDS,
    loop_settings: LoopSettings | None = None,
) -> LoopVerdict | None:
    return run(Tokenizer()(text, pattern), loop_settings)


def token_at(tokens: list[tuple[int, str]], char_pos: int) -> int:
    """Index of the token that holds character `char_pos`."""
    end = 0
    for index, (_, piece) in enumerate(tokens):
        end += len(piece)
        if end > char_pos:
            return index
    raise AssertionError(f"no token at {char_pos}")


# --- each kind fires on a clear example ---------------------------------------------------


def test_periodic_tokens() -> None:
    verdict = scan("ok " * 20)
    assert verdict is not None
    assert verdict.kind is LoopKind.PERIODIC_TOKENS
    assert verdict.period == 2
    assert verdict.at_token == 23  # 12 copies of ["ok", " "] make the 24-token minimum
    assert "'ok '" in verdict.detail


def test_periodic_tokens_by_id_when_text_is_empty() -> None:
    # Token ids alone are enough: partial UTF-8 pieces decode to ''.
    verdict = run([(tid, "") for tid in [5, 6, 7] * 10])
    assert verdict is not None
    assert (verdict.kind, verdict.period, verdict.at_token) == (LoopKind.PERIODIC_TOKENS, 3, 23)


def test_periodic_needs_min_repeats_copies() -> None:
    # A 10-token block satisfies min_loop_tokens with two copies but needs a third.
    block = "alpha beta gamma delta epsilon "
    tokens = Tokenizer()(block * 4)
    assert len(tokens) == 40
    verdict = run(tokens)
    assert verdict is not None
    assert (verdict.kind, verdict.period, verdict.at_token) == (LoopKind.PERIODIC_TOKENS, 10, 29)


def test_periodic_at_max_period() -> None:
    block = [(i, f"w{i} ") for i in range(8)]
    # the words are numbered: the counting detector, off here, would see "w# " repeating
    no_count = {"count_repeats": 10**6, "count_early_chars": 10**6}
    verdict = run(block * 3, LoopSettings(max_period=8, **no_count))
    assert verdict is not None
    assert (verdict.kind, verdict.period, verdict.at_token) == (LoopKind.PERIODIC_TOKENS, 8, 23)
    assert run(block * 3, LoopSettings(max_period=7, **no_count)) is None


def test_repeated_chunk() -> None:
    # 3-character tokens over a 20-character phrase repeat only every 60 characters, so the
    # token detector lags and the character chunks catch it first.
    phrase = "abc def ghi jkl mno "
    tokens = Tokenizer()(phrase * 12, THREES)
    verdict = run(tokens)
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_CHUNK
    assert verdict.period == len(phrase)
    # Fifth copy of the first 50-character chunk ends at character 50 + 4 * 20.
    assert verdict.at_token == token_at(tokens, 50 + 4 * 20 - 1)


def test_repeated_chunk_inside_json_string() -> None:
    # A rationale that cycles without ever ending a sentence.
    text = '{"decision": "deny", "rationale": "' + "the agent keeps deleting files and " * 8
    verdict = scan(text, THREES)
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_CHUNK
    assert verdict.period == len("the agent keeps deleting files and ")


def test_repeated_chunk_must_be_close_together() -> None:
    # A stock phrase that recurs every ~300 characters is style, not a loop.
    phrase = "according to the policy on destructive commands, "
    text = "".join(
        phrase
        + " ".join(
            "w" + "abcdefghij"[i] + "klmnopqrstuvwxyz"[j % 16] + "abcdefghij"[j // 16]
            for j in range(50)
        )
        + " "
        for i in range(6)
    )
    assert scan(text, THREES) is None
    close = LoopSettings(chunk_window=10_000)
    verdict = scan(text, THREES, close)
    assert verdict is not None and verdict.kind is LoopKind.REPEATED_CHUNK


def test_whitespace_run() -> None:
    tokens = Tokenizer()('{"decision":' + " " * 100, r"\S+| {1,4}")
    verdict = run(tokens)
    assert verdict is not None
    assert (verdict.kind, verdict.period) == (LoopKind.WHITESPACE_RUN, 1)
    assert verdict.at_token == token_at(tokens, len('{"decision":') + 63)


def test_escaped_blank_lines_are_no_chunk() -> None:
    # 40 blank lines escaped in a JSON string, 4 to a token as Qwen writes them: fewer than
    # 64 blanks, and the "n" of "\\n" is no letter, so no 50-character chunk repeats either
    text = json.dumps({"rationale": "Create issue" + "\n" * 40 + "Cancel"})
    assert scan(text, r"(?:\\n){1,4}|\w+|[^\w\s]|\s") is None
    verdict = scan(json.dumps({"rationale": "Create issue" + "\n" * 80}), r"(?:\\n){1,4}|.")
    assert verdict is not None and verdict.kind is LoopKind.WHITESPACE_RUN


def test_newline_run_in_big_tokens() -> None:
    verdict = scan('{"decision": "deny",' + "\n\n\n\n" * 30, r"\n{4}|[^\n]+")
    assert verdict is not None
    assert verdict.kind is LoopKind.WHITESPACE_RUN
    assert verdict.at_token == 16  # 16 tokens of 4 newlines reach 64


@pytest.mark.parametrize(
    "run_text, period",
    [
        ("!" * 120, 1),
        ("." * 120, 1),
        (", " * 120, 1),
        ("-." * 80, 2),
        ('"", ' * 60, 3),
    ],
)
def test_punctuation_run(run_text: str, period: int) -> None:
    # counted in characters: 96 marks, whatever the tokens that carry them
    for pattern in (r".{1,8}", r".{1,12}"):
        verdict = scan("Wait" + run_text, pattern)
        assert verdict is not None
        assert (verdict.kind, verdict.period) == (LoopKind.PUNCTUATION_RUN, period)
        assert verdict.detail.startswith("96 punctuation characters")


@pytest.mark.parametrize("run_text", ["!" * 60, ". " * 60, "-." * 40, "\\n" * 40])
def test_symbol_runs_of_small_tokens_fire_within_32_tokens(run_text: str) -> None:
    # one token per mark would take 96 tokens to reach the character threshold
    tokens = Tokenizer()("Wait" + run_text, WORDS)
    verdict = run(tokens)
    assert verdict is not None and verdict.kind is LoopKind.PERIODIC_TOKENS
    assert verdict.at_token <= 1 + 32


@pytest.mark.parametrize("pattern", [WORDS, BPE_LIKE])
def test_gemma_sentence_loop_inside_json(pattern: str) -> None:
    # Fires as REPEATED_SENTENCE on the third "." (the periodic detector is one token short
    # there, because the first copy follows a quote rather than a space).
    text = '{"decision": "deny", "reason": "' + GEMMA + '"}'
    tokens = Tokenizer()(text, pattern)
    verdict = run(tokens)
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_SENTENCE
    assert verdict.detail == 'sentence "The policy is not clear." x3'
    second_end = token_at(tokens, text.index("clear.", text.index("clear.") + 1) + 5)
    third_end = token_at(tokens, text.rindex("clear.") + 5)
    # a full stop ends a sentence once the next character shows it is not "example.com"
    assert verdict.at_token == third_end + 1
    assert second_end < verdict.at_token <= second_end + 32


def test_a_repeated_line_needs_its_whole_cycle_again() -> None:
    # A B A B A is a loop; A X A Y A is a listing that comes back to one line
    cycle = "The request is denied now\nRule R1 forbids deleting data\n"
    verdict = scan(cycle * 3)
    assert verdict is not None and verdict.kind is LoopKind.REPEATED_SENTENCE
    listing = "".join(f"The request is denied now\n{w} is a different line\n" for w in "ABC")
    assert scan(listing) is None
    # ...but a sentence with its full stop is a loop whatever comes between (Gemma-270m)
    heads = ["POLICY", "POLICY_ACTION", "POLICY_ACTION_POLICY"]
    gemma = "".join(f"{h}:\nThe policy is a policy action.\n\n" for h in heads)
    verdict = scan(gemma)
    assert verdict is not None and verdict.kind is LoopKind.REPEATED_SENTENCE


def test_gemma_sentence_loop_plain_text() -> None:
    verdict = scan(GEMMA)
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_SENTENCE


def test_sentence_normalisation_and_newlines() -> None:
    verdict = scan(
        "Rule R1 does apply here\nrule r1  DOES apply here!\n  Rule R1 does apply here?\n"
    )
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_SENTENCE
    assert verdict.period == len("rule r1 does apply here")


def test_json_escaped_newline_ends_sentence() -> None:
    verdict = scan(
        '{"reason": "No consent was given\\nNo consent was given\\nNo consent was given\\n"}'
    )
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_SENTENCE


def test_repeated_value() -> None:
    text = (
        '{"decision": "deny", "evidence": ["R1 applies", "R1 applies", "R1 applies", "R1 applies"'
    )
    tokens = Tokenizer()(text)
    verdict = run(tokens)
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_VALUE
    assert verdict.detail == 'value "R1 applies" x3'
    third = [m.start() for m in re.finditer('"R1 applies"', text)][2]
    assert verdict.at_token == token_at(tokens, third + len('"R1 applies"') - 1)


def test_repeated_long_object_value() -> None:
    item = '{"rule": "R%d", "reason": "destructive command"}'
    verdict = scan("[" + ", ".join(item % i for i in range(5)) + "]")
    assert verdict is not None
    assert verdict.kind is LoopKind.REPEATED_VALUE


# --- must not fire on legitimate output ---------------------------------------------------


@pytest.mark.parametrize("pattern", [WORDS, BPE_LIKE, DIGITS, THREES])
@pytest.mark.parametrize(
    "text",
    [
        json.dumps(ANSWER),
        json.dumps(ANSWER, indent=2),
        json.dumps({"evidence": [f"rule-{i:03d}" for i in range(1, 41)]}),
        json.dumps({"evidence": [f"rule-{i:03d}" for i in range(1, 41)]}, indent=4),
        json.dumps(
            {
                "evidence": [
                    "Do not delete production data",
                    "Do not delete production logs",
                    "Do not delete production backups",
                ]
            }
        ),
        json.dumps({"count": 1000000, "bytes": 10000000000, "ratio": 0.5, "score": 0.25}),
        "{\n" + " " * 40 + '"decision": "deny",\n' + " " * 40 + '"confidence": 0.9\n}',
        json.dumps(
            [{"decision": "deny", "confidence": 0.1}, {"decision": "allow", "confidence": 0.2}]
        ),
        # same-shaped objects: long stretches of structure, keys and enum values recur
        json.dumps([{"rule": f"R{i}", "status": "pass", "severity": "high"} for i in range(6)]),
        json.dumps(
            [{"justification": f"J{i}", "recommendation": "allow"} for i in range(8)], indent=2
        ),
        json.dumps(
            [
                {"id": f"R{i}", "justification_for_decision": "allow", "recommendation": "deny"}
                for i in range(8)
            ]
        ),
        json.dumps(
            [
                {"id": f"R{i}", "a": True, "b": False, "c": True, "d": False, "e": None, "f": None}
                for i in range(8)
            ]
        ),
        "Yes. No. Maybe. Yes. Sure. No. Yes. OK.",
        "The score went from 0.5 to 0.75 and then to 0.9. It is 0.5 again.",
        # a decimal point does not end a sentence, so these are three different sentences
        "Confidence is 0.5 for rule R1. Confidence is 0.7 for rule R1. Confidence is 0.9 for rule R1.",
        # what tools print, quoted in a rationale: short units a few times, numbers, cards
        json.dumps({"card_number": "4444 4444 4444 4444", "test_card": "4111111111111111"}),
        "(np.float64(3.4666666666666667), 9223372036854775807)",
        "Linux localhost 5.15.0-76-generic x86_64 x86_64 x86_64 GNU/Linux",
        # a web page's separator line between different lines; a shell error after each line
        "Games\n<::before><::after>\n_search_\n<::before><::after>\n_help_\n<::before><::after>\n",
        "&& sleep 2 \\\nbash: syntax error near unexpected token `&&'\n&& export A=1 \\\n"
        "bash: syntax error near unexpected token `&&'\n&& ls -l /tmp \\\n"
        "bash: syntax error near unexpected token `&&'\n",
    ],
)
def test_legitimate_output_does_not_fire(text: str, pattern: str) -> None:
    assert scan(text, pattern) is None


def test_long_varied_stream() -> None:
    # 5,000 tokens of ordinary varied JSON: nothing fires and the detector keeps up.
    rng = random.Random(7)
    words = [
        "agent",
        "deletes",
        "reads",
        "file",
        "home",
        "policy",
        "rule",
        "consent",
        "user",
        "command",
        "backup",
        "log",
        "runs",
        "without",
        "with",
        "the",
        "a",
        "data",
    ]
    items = [
        {
            "id": f"item-{i}",
            "rule": f"R{rng.randrange(100)}",
            "note": " ".join(rng.choice(words) for _ in range(rng.randrange(4, 12))) + f" {i}.",
            "score": round(rng.random(), 3),
        }
        for i in range(400)
    ]
    tokens = Tokenizer()(json.dumps(items, indent=2), BPE_LIKE)[:5000]
    assert len(tokens) == 5000
    assert run(tokens) is None


# --- lifecycle and settings -----------------------------------------------------------------


def test_verdict_sticks_and_reset_clears() -> None:
    tokenizer = Tokenizer()
    detector = LoopDetector()
    for token_id, piece in tokenizer("ok " * 20):
        detector.feed(token_id, piece)
    fired = detector.verdict
    assert fired is not None
    assert detector.feed(99, "fresh text") is fired
    assert detector.tokens_seen == 41
    detector.reset()
    assert detector.verdict is None and detector.tokens_seen == 0
    # Earlier counts are gone too: two more copies of a sentence are not yet three.
    for token_id, piece in tokenizer("The policy is not clear. The policy is not clear. "):
        assert detector.feed(token_id, piece) is None
    for token_id, piece in tokenizer("The policy is not clear. "):
        detector.feed(token_id, piece)
    assert detector.verdict is not None
    assert detector.verdict.kind is LoopKind.REPEATED_SENTENCE


def test_disabled_never_fires() -> None:
    off = LoopSettings(enabled=False)
    for text in ("ok " * 50, GEMMA, " " * 200, "!" * 200):
        assert scan(text, loop_settings=off) is None


def test_thresholds_are_configurable() -> None:
    two = LoopSettings(sentence_repeats=2)
    verdict = scan("The policy is not clear. The policy is not clear. ", loop_settings=two)
    assert verdict is not None and verdict.kind is LoopKind.REPEATED_SENTENCE
    assert scan(" " * 100, loop_settings=LoopSettings(max_whitespace_run=101)) is None
    assert scan("Wait" + "!" * 30, loop_settings=LoopSettings(max_punct_run=20)) is not None


@pytest.mark.parametrize("field", ["max_period", "min_repeats", "chunk_size", "sentence_repeats"])
def test_settings_reject_nonsense(field: str) -> None:
    with pytest.raises(ValueError, match=field):
        kwargs: dict[str, Any] = {field: 0}
        LoopSettings(**kwargs)


# --- properties -----------------------------------------------------------------------------

distinct_words = st.lists(
    st.text(string.ascii_lowercase, min_size=1, max_size=10), min_size=3, max_size=60, unique=True
)


@settings(max_examples=60, deadline=None)
@given(
    words=distinct_words,
    sentence_length=st.integers(1, 8),
    pattern=st.sampled_from([WORDS, BPE_LIKE]),
)
def test_distinct_words_never_fire(words: list[str], sentence_length: int, pattern: str) -> None:
    sentences = [
        " ".join(words[i : i + sentence_length]).capitalize() + "."
        for i in range(0, len(words), sentence_length)
    ]
    assert scan(" ".join(sentences), pattern) is None
    assert scan(json.dumps({"evidence": words, "reason": " ".join(sentences)}), pattern) is None


@settings(max_examples=80, deadline=None)
@given(
    block=st.lists(st.integers(0, 40), min_size=1, max_size=20),
    max_period=st.integers(20, 64),
    min_repeats=st.integers(2, 4),
    min_loop_tokens=st.integers(1, 30),
)
def test_repeated_block_always_fires(
    block: list[int], max_period: int, min_repeats: int, min_loop_tokens: int
) -> None:
    # Word tokens only, and the chunk detector switched off, so only PERIODIC_TOKENS can fire.
    loop_settings = LoopSettings(
        max_period=max_period,
        min_repeats=min_repeats,
        min_loop_tokens=min_loop_tokens,
        chunk_repeats=10**6,
        count_repeats=10**6,
        count_early_chars=10**6,
    )
    period = len(block)
    copies = max(min_repeats, math.ceil(min_loop_tokens / period))
    tokens = [(word, f"w{word} ") for word in block] * (copies + 2)
    verdict = run(tokens, loop_settings)
    assert verdict is not None
    assert verdict.kind is LoopKind.PERIODIC_TOKENS
    assert min_loop_tokens - 1 <= verdict.at_token <= copies * period - 1
    assert 1 <= verdict.period <= period


def test_counting_loops_fire_but_separate_ids_do_not() -> None:
    # real SmolLM2-135M outputs: empty enumerations and runaway year lists
    for text in (
        "- 1.\n- 2.\n- 3.\n- 4.\n- 5.\n- 6.\n- 7.\n- 8.\n- 9.\n- 10.\n",
        "Step 1:\n\nStep 2:\n\nStep 3:\n\nStep 4:\n\nStep 5:\n\nStep 6:\n\nStep 7:\n\n",
        "in 2018, 2019, 2020, 2021, 2022, 2023, 2024, 2025, 2026, 2027, 2028",
    ):
        verdict = scan(text, ".{1,3}")
        assert verdict is not None and verdict.kind is LoopKind.COUNTING, text
    # an identifier with digits, quoted in every copy, is text: the counter still counts
    verdict = scan("".join(f"Item {i}: holding towel paper_towel_005 now.\n" for i in range(8, 20)))
    assert verdict is not None and verdict.kind is LoopKind.COUNTING
    ids = json.dumps({"evidence": [f"rule-{i:03d}" for i in range(1, 41)]})
    assert scan(ids, ".{1,3}") is None
    assert scan("Run steps 1, 2, 3, 4 and 5 in order, then stop.", ".{1,3}") is None


def test_a_string_that_ends_on_a_digit_does_not_break_the_next() -> None:
    text = json.dumps({"a": "version 12", "b": "7 days", "c": ["x1", "9"]})
    assert scan(text, ".{1,3}") is None
    assert scan(text, ".") is None
