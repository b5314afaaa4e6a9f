"""The loop detector on real agent text (../shared/data/train), tokenised by the edge model.

Loops of every family are built by `benchmarks.loop_families` from the thoughts, messages and
tool outputs of other people's agents; each must be caught within its delay bound (32 tokens
after the second period, 48 for paraphrases). And the real text itself, fed as the rationale
of an answer, must not be cut, except where it holds a loop of its own.
"""

from __future__ import annotations

import random
from collections import Counter

import pytest
from hypothesis import given, settings
from hypothesis import strategies as st

from benchmarks.loop_families import (
    FAMILIES,
    TRAIN,
    Pool,
    Texts,
    Vocabulary,
    feed_text,
    holds_loop,
    load_texts,
    replay,
)
from service.guards.loops import LoopKind
from service.ops.weights import ModelStoreError

pytestmark = [
    pytest.mark.model,
    pytest.mark.skipif(not TRAIN.is_dir(), reason="../shared/data/train is not beside the project"),
]


@pytest.fixture(scope="module")
def vocab() -> Vocabulary:
    try:
        return Vocabulary.edge()
    except ModelStoreError as exc:
        pytest.skip(f"the edge model is not installed: {exc}")


@pytest.fixture(scope="module")
def texts() -> Texts:
    return load_texts()


@pytest.fixture(scope="module")
def pool(texts: Texts) -> Pool:
    return Pool(texts)


@pytest.mark.parametrize("family", list(FAMILIES))
@settings(max_examples=20, deadline=None, derandomize=True)
@given(seed=st.integers(0, 2**32 - 1))
def test_every_family_is_caught(family: str, seed: int, vocab: Vocabulary, pool: Pool) -> None:
    # Every loop is caught, and well before its fourth copy; the bound itself is a rate (99 %
    # within it), checked by test_recall_per_family.
    loop = FAMILIES[family](random.Random(seed), pool)
    result = replay(loop, vocab)
    assert result.fired is not None, f"missed: {loop.text[:300]!r}"
    assert result.delay is not None and result.delay <= 2 * loop.bound, (
        f"{result.delay} tokens late ({result.fired.detail}): {loop.text[: loop.second_end]!r}"
    )


def test_recall_per_family(vocab: Vocabulary, pool: Pool) -> None:
    # the targets of issue 20: 99 % of loops caught within the bound, in every family
    for family, build in FAMILIES.items():
        rng = random.Random(f"recall-{family}")
        loops = [build(rng, pool) for _ in range(100)]
        in_time = 0
        for loop in loops:
            result = replay(loop, vocab)
            in_time += result.delay is not None and result.delay <= loop.bound
        assert in_time >= 99, f"{family}: {in_time}/100 within the bound"


def test_hex_strings_and_hashes_are_not_periodic(vocab: Vocabulary) -> None:
    for text in (
        "The transfer went to 0x9876543210abcdef9876543210abcdef98765432, as requested.",
        "Burn address 0x000000000000000000000000000000000000dEaD received 0x0000000000000000.",
        "Commit 1358d3fc4d02f62b7b1b4f617902130305d12d5f and UUID 123e4567-e89b-12d3-a456-426614174000.",
        "Token QUJDREVGR0hJSktMTU5PUFFSU1RVVldYWVo= and card 4929 1057 3862 5510 on file.",
        "sha256 e3b0c44298fc1c149afbf4c8996fb92427ae41e4649b934ca495991b7852b855 matches.",
    ):
        for as_json in (True, False):
            verdict, _ = feed_text(text, vocab, as_json)
            assert verdict is None, (text, verdict)


def test_what_tools_print_a_few_times_is_not_a_loop(vocab: Vocabulary) -> None:
    # 12 to 21 edge tokens: under the 24-token minimum of a periodic loop
    for text in (
        "Linux localhost 5.15.0-76-generic #83-Ubuntu SMP x86_64 x86_64 x86_64 GNU/Linux",
        "card 4444 4444 4444 4444, test card 4111111111111111, ratio 3.4666666666666667",
    ):
        for as_json in (True, False):
            verdict, _ = feed_text(text, vocab, as_json)
            assert verdict is None, (text, verdict)


def test_real_text_is_not_cut(vocab: Vocabulary, texts: Texts) -> None:
    """Every thought, message and tool output, fed as an answer's rationale. Text that holds
    a loop itself (an independent labeller: a block 3 times in a row, 64 blanks) may fire."""
    for name, items, target in (("prose", texts.prose, 0.001), ("tools", texts.tools, 0.005)):
        fired: Counter[str] = Counter()
        clean = 0
        for text in items:
            if holds_loop(text):
                continue
            clean += 1
            verdict, _ = feed_text(text, vocab, as_json=True)
            if verdict is not None:
                fired[verdict.kind.value] += 1
        rate = sum(fired.values()) / clean
        # the targets of issue 20 (measured 0.05 % and 0.16 %, docs/loops.md)
        assert rate <= target, f"{name}: {rate:.4f} ({dict(fired)})"
        assert set(fired) <= set(LoopKind)
