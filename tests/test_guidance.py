"""Constrained decoding with llguidance (service/backends/guidance.py): the token mask on
SmolLM2's real vocabulary without running the model, then the llama.cpp backend generating
under each grammar engine on the real model."""

from __future__ import annotations

import time
from collections.abc import Iterator
from typing import Any

import numpy as np
import pytest

from service.backends.base import ChatMessage, Finish, GenerationRequest, Prompt
from service.backends.guidance import (
    GrammarCompiler,
    GuidanceLogitsProcessor,
    TokenMask,
    llama_cpp_tokenizer,
)
from service.backends.llama_cpp import LlamaCppBackend
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.verify import is_complete, parse_answer
from service.errors import BackendError
from service.guards.loops import LoopDetector, LoopSettings
from service.ops.weights import ModelStore
from service.settings import load_settings

SMOL = "smollm2-135m-instruct-q4_1"
SHAPE = AnswerShape(("R1", "R2"), (1, 2), max_cited=2, rationale_chars=120, revision_chars=80)
TERSE = AnswerShape(("R1", "R2"), (1, 2), 2, 120, 80, explain=False)


def _smol_path() -> Any:
    try:
        return ModelStore(load_settings()).resolve(SMOL)
    except Exception as exc:  # not installed: scripts/test.sh installs it
        pytest.skip(f"{SMOL} is not installed: {exc}")


@pytest.fixture(scope="module")
def vocab() -> Iterator[tuple[Any, GrammarCompiler]]:
    """SmolLM2's vocabulary only (no weights evaluated): llguidance's tokenizer over it."""
    from llama_cpp import Llama

    llm = Llama(model_path=str(_smol_path()), vocab_only=True, verbose=False)
    try:
        yield llm, GrammarCompiler(llama_cpp_tokenizer(llm._model.vocab))
    finally:
        llm.close()


def _decode(llm: Any, compiler: GrammarCompiler, shape: AnswerShape, seed: int) -> str:
    """Greedy decoding of random logits under the mask: whatever the 'model' prefers, the
    text must be an answer of the shape."""
    mask = TokenMask(compiler.matcher(build_constraint(shape).gbnf), llm.n_vocab(), llm.token_eos())
    processor = GuidanceLogitsProcessor(mask)
    rng = np.random.default_rng(seed)
    ids = [1, 2, 3]  # a stand-in prompt
    for _ in range(400):
        logits = rng.normal(size=llm.n_vocab()).astype(np.float32)
        token = int(np.argmax(processor(np.array(ids), logits)))
        if token == llm.token_eos():
            break
        ids.append(token)
    assert mask.error is None
    assert mask.matcher.is_accepting()
    return RESPONSE_PREFIX + bytes(llm.detokenize(ids[3:])).decode()


@pytest.mark.parametrize("shape", [SHAPE, TERSE], ids=["explain", "decision-only"])
def test_the_mask_holds_any_logits_to_the_answer_shape(vocab: Any, shape: AnswerShape) -> None:
    llm, compiler = vocab
    for seed in range(3):
        answer = parse_answer(_decode(llm, compiler, shape, seed), shape)
        assert set(answer.evidence) <= {"R1", "R2"}
        assert (answer.revision is not None) == (answer.decision == "revise")
        if not shape.explain:
            assert answer.rationale == ""


def test_a_rejected_token_ends_generation_with_only_end_of_sequence(vocab: Any) -> None:
    llm, compiler = vocab
    mask = TokenMask(compiler.matcher(build_constraint(SHAPE).gbnf), llm.n_vocab(), llm.token_eos())
    allowed = mask.allowed(llm.n_vocab())
    assert 0 < allowed.sum() < llm.n_vocab() // 10  # a decision word starts the answer
    bad = int(np.flatnonzero(~allowed)[0])
    assert not mask.consume(bad)
    assert mask.error is not None and "rejected" in mask.error
    after = mask.allowed(llm.n_vocab())
    assert after.sum() == 1 and after[llm.token_eos()]


def test_compiled_grammars_are_reused_and_each_request_starts_fresh(vocab: Any) -> None:
    llm, compiler = vocab
    gbnf = build_constraint(SHAPE).gbnf
    first = compiler.matcher(gbnf)
    compiled = len(compiler._compiled)
    token = llm.tokenize(b"deny", add_bos=False, special=False)[0]
    assert first.consume_token(token)
    second = compiler.matcher(gbnf)
    assert second is not first
    assert second.consume_token(token)  # not advanced by the first request's token
    assert len(compiler._compiled) == compiled


def test_grammar_engine_is_a_tier_setting(monkeypatch: pytest.MonkeyPatch) -> None:
    assert load_settings().tiers["edge"].grammar_engine == "llguidance"
    assert load_settings().tiers["edge"].flash_attn is True
    monkeypatch.setenv("GATEKEEPER_TIERS__EDGE__GRAMMAR_ENGINE", "llama_cpp")
    monkeypatch.setenv("GATEKEEPER_TIERS__EDGE__FLASH_ATTN", "false")
    edge = load_settings().tiers["edge"]
    assert edge.grammar_engine == "llama_cpp" and edge.flash_attn is False


# ---- the real model --------------------------------------------------------------------


def _prompt(action: str) -> Prompt:
    return Prompt(
        (
            ChatMessage("system", "You judge agent actions. Answer in JSON."),
            ChatMessage(
                "user",
                "## Evidence\n[R1] Never delete user data.\n[R2] Be helpful.\n## History\n"
                f"[1] user: clean up\n[2] agent: ls\n## Proposed action\n{action}",
            ),
        ),
        RESPONSE_PREFIX,
    )


@pytest.fixture(scope="module", params=["llguidance", "llama_cpp"])
def backend(request: pytest.FixtureRequest) -> Iterator[LlamaCppBackend]:
    loaded = LlamaCppBackend(
        SMOL, _smol_path(), n_ctx=2048, n_threads=2, grammar_engine=request.param
    )
    loaded.load()
    yield loaded
    loaded.close()


@pytest.mark.model
@pytest.mark.parametrize("shape", [SHAPE, TERSE], ids=["explain", "decision-only"])
@pytest.mark.parametrize("forced", ["deny", "revise", None])
def test_real_answers_parse_under_both_engines(
    backend: LlamaCppBackend, shape: AnswerShape, forced: str | None
) -> None:
    request = GenerationRequest(
        _prompt("shell: rm -rf /home/user"),
        build_constraint(shape),
        max_tokens=256,  # over the grammar's bound even at one character a token
        deadline=time.monotonic() + 300,  # behaviour, not speed: llama.cpp's GBNF sampler is slow
        choose=None if forced is None else (lambda _probs: forced),
    )
    generation = backend.generate(request)
    assert generation.finish == Finish.STOP
    answer = parse_answer(RESPONSE_PREFIX + generation.text, shape)
    if forced is not None:
        assert answer.decision == forced  # the forced first token survives the mask
    assert (answer.revision is not None) == (answer.decision == "revise")
    assert set(generation.choice_probs) == {"allow", "deny", "revise", "escalate"}
    if not shape.explain and answer.decision != "revise":
        assert generation.completion_tokens <= 4  # the decision, the forced close, the end


@pytest.mark.model
def test_the_pipeline_hooks_see_every_piece_and_stop_generation(backend: LlamaCppBackend) -> None:
    detector = LoopDetector(LoopSettings())  # what decision/generation.py runs on every token
    detector.feed(-1, RESPONSE_PREFIX)
    text = RESPONSE_PREFIX

    def on_token(token: int, piece: str) -> bool:
        nonlocal text
        text += piece
        return detector.feed(token, piece) is not None or is_complete(text)

    request = GenerationRequest(_prompt("ls"), build_constraint(SHAPE), 120, time.monotonic() + 60)
    done = backend.generate(request, on_token)
    assert done.finish == Finish.HOOK  # at the closing brace, one token before end-of-sequence
    assert detector.verdict is None and text == RESPONSE_PREFIX + done.text
    parse_answer(text, SHAPE)
    # a stop mid-answer leaves nothing behind: the next request starts a fresh matcher
    cut = backend.generate(request, lambda _token, _piece: True)
    assert cut.finish == Finish.HOOK and cut.completion_tokens == 1
    again = backend.generate(request)
    assert again.finish == Finish.STOP
    assert parse_answer(RESPONSE_PREFIX + again.text, SHAPE) == parse_answer(text, SHAPE)


@pytest.mark.model
def test_a_grammar_fault_fails_the_generation(
    backend: LlamaCppBackend, monkeypatch: pytest.MonkeyPatch
) -> None:
    if backend._grammars is None:
        pytest.skip("llama.cpp's own grammar sampler has no matcher to break")

    def reject(self: TokenMask, token: int) -> bool:
        self.error = f"rejected {token}"
        return False

    monkeypatch.setattr(TokenMask, "consume", reject)
    request = GenerationRequest(_prompt("ls"), build_constraint(SHAPE), 60, time.monotonic() + 60)
    with pytest.raises(BackendError, match="constrained decoding failed"):
        backend.generate(request)
