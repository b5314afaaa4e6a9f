"""The probe path (issue #9) with a scripted backend that exposes hidden states: the decision
and citations come from the probe after one prefill; generation adds only the rationale, when
asked and when the budget allows; a probe for another model is refused."""

from __future__ import annotations

import json
import time
from pathlib import Path
from typing import Any

import numpy as np
import pytest

from service.backends.base import HiddenStates, Prompt
from service.backends.fake import FakeBackend, Script
from service.decision.ood import OodGuard
from service.decision.probes import PROBE_PROMPT_VERSION, LinearProbe, ProbeMismatchError, ProbeSet
from service.errors import BackendError, ConfigurationError
from service.settings import TierSettings
from tests.conftest import answer, fake_app, sample_request

D = 8
SHA = "ab" * 32


class HiddenFake(FakeBackend):
    """Hidden states as a function of the prompt: dimension 0 of the last token is +3 when
    the proposed action deletes something, -3 otherwise; dimension 1 of a roll-call line is
    +3 for the items named in `applies`; dimension 5 of the last token is `ood_shift`, which
    the guard of `probe_file` reads as out of distribution from 1 on."""

    def __init__(self, *args: Any, applies: tuple[str, ...] = ("R1",), **kw: Any) -> None:
        super().__init__(*args, **kw)
        self.applies = applies
        self.prefills: list[tuple[int, ...]] = []
        self.spans: list[tuple[str, str | None] | None] = []
        self.untils: list[str | None] = []
        self.shallow: list[str | None] = []
        self.marks_read: list[tuple[str, ...]] = []
        self.prefill_error: str | None = None
        self.prefill_delay_s = 0.0
        self.ood_shift = 0.0
        self.loudness = 3.0  # dimension 0's size, which the decision probe reads as its score

    @property
    def n_layers(self) -> int:
        return 6

    @property
    def model_sha256(self) -> str:
        return SHA

    def hidden_states(
        self,
        prompt: Prompt,
        *,
        layers: tuple[int, ...],
        marks: tuple[str, ...] = (),
        choices: tuple[str, ...] = (),
        deadline: float | None = None,
        span: tuple[str, str | None] | None = None,
        until: str | None = None,
        shallow_after: str | None = None,
    ) -> HiddenStates:
        self.shallow.append(shallow_after)
        self.prefills.append(layers)
        self.spans.append(span)
        self.untils.append(until)
        self.marks_read.append(marks)
        if until is not None:
            assert until in prompt.messages[-1].content
            assert not marks or until not in marks  # marks past `until` are never evaluated
        time.sleep(self.prefill_delay_s)
        if self.prefill_error:
            raise BackendError(self.prefill_error)
        user = prompt.messages[-1].content
        action = user[user.index("## Proposed action") :]
        last = np.zeros((len(layers), D), np.float32)
        last[:, 0] = self.loudness if "rm -rf" in action else -self.loudness
        last[:, 5] = self.ood_shift
        out = np.zeros((len(layers), len(marks), D), np.float32)
        for j, mark in enumerate(marks):
            item = mark[1 : mark.index("]")]
            out[:, j, 1] = 3.0 if item in self.applies else -3.0
        # the mean over the action reads the other way round: a probe that reads it must
        # have been told to (decision_read), or it decides wrongly
        span_mean = -last if span is not None else None
        return HiddenStates(
            layers,
            last,
            out,
            prompt_tokens=500,
            cached_tokens=100,
            prefill_s=0.05,
            span_mean=span_mean,
        )


def _probe(dim: int, layer: int) -> LinearProbe:
    coef = np.zeros(D, np.float32)
    coef[dim] = 1.0
    return LinearProbe(layer, np.zeros(D), np.ones(D), coef, intercept=0.0)


def fake_guard(layer: int = 3) -> OodGuard:
    """In distribution: dimensions 0 and 1 within 6 of zero (Mahalanobis 2 with variance 9),
    less than 1 elsewhere (the residual), and the decision probe's score within 4 of zero."""
    return OodGuard(
        layer=layer,
        mean=np.zeros(D),
        scale=np.ones(D),
        components=np.eye(D)[:2],
        location=np.zeros(2),
        precision=np.eye(2) / 9.0,
        max_distance=2.0,
        max_residual=1.0,
        min_score=-4.0,
        max_score=4.0,
    )


def probe_file(tmp_path: Path, sha: str = SHA, prompt_version: str = PROBE_PROMPT_VERSION) -> Path:
    probes = ProbeSet(
        model="fake-model",
        model_sha256=sha,
        prompt_version=prompt_version,
        decision=_probe(0, 3),
        relevance=_probe(1, 2),
        allow_below=0.2,
        deny_above=0.8,
        relevance_threshold=0.5,
        trained={"test": True},
        guard=fake_guard(),
    )
    path = tmp_path / "probe.json"
    probes.save(path)
    return path


def action_mean_probe_file(tmp_path: Path) -> Path:
    """probe_file, reading the action's mean (HiddenFake's is -last, so the sign flips)."""
    path = probe_file(tmp_path)
    raw = json.loads(path.read_text())
    raw["decision_read"] = "action_mean"
    raw["decision"]["coef"] = [-c for c in raw["decision"]["coef"]]
    path.write_text(json.dumps(raw))
    return path


def probe_tiers(path: Path) -> dict[str, TierSettings]:
    return {"edge": TierSettings(backend="fake", probe=path)}


async def test_probe_decides_and_cites_after_one_prefill(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(answer("deny", rationale="It wipes every home folder."))])
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
    assert body["decision"] == "deny"
    assert body["decided_by"] == "probe"
    assert [e["id"] for e in body["evidence"]] == ["R1"]  # only the item that applies
    assert body["confidence"] > 0.9
    assert body["rationale"] == "It wipes every home folder."
    assert edge.prefills == [(2, 3)]  # the two probes' layers, read in one prefill
    (generation,) = edge.requests
    assert generation.choose is not None and generation.choose({"allow": 0.99}) == "deny"
    assert "evidence" not in generation.constraint.schema["properties"]  # the probe cites


async def test_a_probe_can_read_the_mean_over_the_proposed_action(tmp_path: Path) -> None:
    """decision_read = action_mean: the backend is asked for the action's span and the
    decision probe and its guard read its mean (HiddenFake's mean is the last token's
    negative, so a probe reading the wrong rows would allow the rm -rf)."""
    from service.decision.prompt import ACTION_SPAN

    path = action_mean_probe_file(tmp_path)
    edge = HiddenFake(scripts=[Script(answer("deny", rationale="It wipes every home folder."))])
    async with fake_app({"edge": edge}, tiers=probe_tiers(path)) as client:
        body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
    assert (body["decision"], body["decided_by"]) == ("deny", "probe")
    assert [e["id"] for e in body["evidence"]] == ["R1"]
    # the decision from a prefill that stops at the roll-call's header, then the roll-call
    # (the relevance probe's layer only) because a deny cites
    assert edge.spans == [ACTION_SPAN, None]
    assert edge.untils == [ACTION_SPAN[1], None]
    assert edge.prefills == [(3,), (2,)] and edge.marks_read[0] == ()
    assert [m[:4] for m in edge.marks_read[1]] == ["[R1]", "[T1]"]  # a line per item
    # the rationale is generated on the prompt with the roll-call, which is in the KV cache
    assert ACTION_SPAN[1] in edge.requests[0].prompt.messages[-1].content
    probes = ProbeSet.load(path)
    assert probes.decision_span(roll_call=False) == (ACTION_SPAN[0], None)  # to the end
    raw = json.loads(path.read_text())
    raw["decision_read"] = "middle"
    with pytest.raises(ConfigurationError, match="decision_read 'middle' unknown"):
        ProbeSet.from_json(raw)
    del raw["decision_read"]  # files written before the option read the last token
    assert ProbeSet.from_json(raw).decision_read == "last"


async def test_an_action_mean_probe_allows_without_reading_the_roll_call(
    tmp_path: Path,
) -> None:
    """An allow needs no citation: the prefill stops at the roll-call's header, and the
    rationale is generated on the prompt without the roll-call."""
    from service.decision.prompt import ACTION_SPAN

    path = action_mean_probe_file(tmp_path)
    edge = HiddenFake(scripts=[Script(answer("allow", rationale="It only reads sizes."))])
    request = sample_request(
        tier="edge", action={"tool": "shell", "arguments": {"cmd": "du -sh ~"}}
    )
    async with fake_app({"edge": edge}, tiers=probe_tiers(path)) as client:
        body = (await client.post("/evaluate", json=request)).json()
    assert (body["decision"], body["decided_by"]) == ("allow", "probe")
    assert body["evidence"] == [] and body["rationale"] == "It only reads sizes."
    assert edge.untils == [ACTION_SPAN[1]] and edge.marks_read == [()]
    (generation,) = edge.requests
    user = generation.prompt.messages[-1].content
    assert ACTION_SPAN[1] not in user and user.endswith('du -sh ~"}')


def _with_items(path: Path, read: str = "last", threshold: float = 0.5) -> None:
    """Give the probe file an item probe that knows sample_request's two items: R1 applies
    when dimension 0 of the decision's vector is high, T1 when it is low."""
    from service.decision.probes import ItemProbe, evidence_digest
    from service.schemas import EvaluateRequest

    request = EvaluateRequest.model_validate(sample_request())
    evidence = request.evidence or []
    sign = 1.0 if read == "last" else -1.0  # HiddenFake's action mean is -last
    coef = np.zeros((2, D), np.float32)
    coef[0, 0], coef[1, 0] = sign, -sign
    raw = json.loads(path.read_text())
    raw["decision_read"] = read
    raw["decision"]["coef"] = [sign * c for c in raw["decision"]["coef"]]
    raw["items"] = ItemProbe(
        layer=4,
        ids=tuple(item.id for item in evidence),
        digests=tuple(evidence_digest(item) for item in evidence),
        mean=np.zeros(D),
        scale=np.ones(D),
        coef=coef,
        intercept=np.zeros(2),
        threshold=threshold,
    ).to_json()
    path.write_text(json.dumps(raw))


async def test_the_item_probe_cites_the_pack_from_the_decision_vector(tmp_path: Path) -> None:
    """An item probe that knows every item in the prompt cites from the decision's vector
    (R1 here), not from the roll-call (where HiddenFake makes T1 apply); an action-mean probe
    with one then denies after a single prefill that stops before the roll-call."""
    from service.decision.prompt import PROFILE_HEADER, ROLL_CALL_HEADER

    for read in ("last", "action_mean"):
        path = probe_file(tmp_path)
        _with_items(path, read)
        assert ProbeSet.load(path).decision_layers == (3, 4)
        edge = HiddenFake(
            scripts=[Script(answer("deny", rationale="It wipes every home folder."))],
            applies=("T1",),
        )
        async with fake_app({"edge": edge}, tiers=probe_tiers(path)) as client:
            body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
        assert (body["decision"], body["decided_by"]) == ("deny", "probe"), read
        assert [e["id"] for e in body["evidence"]] == ["R1"], read
        if read == "action_mean":
            assert edge.untils == [ROLL_CALL_HEADER] and edge.prefills == [(3, 4)]
            # the roll-call was never evaluated: the rationale's prompt leaves it out
            assert ROLL_CALL_HEADER not in edge.requests[0].prompt.messages[-1].content
            assert edge.shallow == [None]  # a rationale follows: the whole network
        else:
            assert edge.untils == [None] and edge.prefills == [(2, 3, 4)]
            assert edge.shallow == [None]
    # without an explanation nothing is generated: the request's text goes only as deep as
    # the probes read, and that faster prefill is not taken for the tier's prefill speed
    from service.app import create_app
    from tests.conftest import fake_settings, running_app

    edge = HiddenFake(scripts=[Script(error="generation must not run")], applies=("T1",))
    app = create_app(fake_settings(tiers=probe_tiers(path)), {"edge": edge})
    async with running_app(app) as client:
        latency = app.state.gatekeeper.pool.get("edge").latency
        before = len(latency._obs)
        request = sample_request(tier="edge", explain=False)
        body = (await client.post("/evaluate", json=request)).json()
        assert len(latency._obs) == before
    assert (body["decision"], [e["id"] for e in body["evidence"]]) == ("deny", ["R1"])
    assert edge.shallow == [PROFILE_HEADER] and edge.requests == []


async def test_items_the_item_probe_does_not_know_are_cited_from_the_roll_call(
    tmp_path: Path,
) -> None:
    """A rule whose text differs from the one the item probe was trained on (same id), or
    an item it never saw, sends the citation to the roll-call's relevance probe."""
    path = probe_file(tmp_path)
    _with_items(path, "action_mean")
    changed = sample_request(tier="edge")
    changed["evidence"][0]["text"] = "Deleting files is fine on Fridays."
    extra = sample_request(tier="edge")
    extra["evidence"].append({"id": "R9", "text": "Keep logs for a year."})
    for request in (changed, extra):
        edge = HiddenFake(scripts=[Script(answer("deny"))], applies=("T1",))
        async with fake_app({"edge": edge}, tiers=probe_tiers(path)) as client:
            body = (await client.post("/evaluate", json=request)).json()
        assert body["decision"] == "deny"
        assert [e["id"] for e in body["evidence"]] == ["T1"]  # the roll-call's
        assert len(edge.prefills) == 2 and edge.marks_read[1]  # the roll-call was read


def test_an_item_probe_with_inconsistent_shapes_is_refused(tmp_path: Path) -> None:
    path = probe_file(tmp_path)
    _with_items(path)
    raw = json.loads(path.read_text())
    raw["items"]["intercept"] = [0.0]
    with pytest.raises(ConfigurationError, match="item probe"):
        ProbeSet.from_json(raw)


async def test_probe_allows_a_safe_action_without_generating(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(error="generation must not run")])
    request = sample_request(
        tier="edge", explain=False, action={"tool": "shell", "arguments": {"cmd": "du -sh ~"}}
    )
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=request)).json()
    assert body["decision"] == "allow" and body["decided_by"] == "probe"
    assert body["evidence"] == [] and not body["degraded"]
    assert body["rationale"].startswith("Probe on layer 3: P(unsafe) = 0.05")
    assert edge.requests == []


async def test_the_rationale_is_skipped_when_the_budget_cannot_hold_it(tmp_path: Path) -> None:
    slow = Script(answer("deny", rationale="It wipes every home folder."), token_delay_s=0.05)
    edge = HiddenFake(scripts=[slow])
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        first = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
        # the tier has now measured ~20 tokens/s of decode: a rationale of ~100 tokens does
        # not fit 1.5 s, the probe's answer does
        tight = sample_request(tier="edge", latency_budget_ms=1500)
        second = (await client.post("/evaluate", json=tight)).json()
    assert first["rationale"] == "It wipes every home folder."
    assert second["decision"] == "deny" and second["decided_by"] == "probe"
    assert second["rationale"].startswith("Probe on layer 3") and not second["degraded"]
    assert len(edge.requests) == 1 and len(edge.prefills) == 2
    assert second["timing"]["total_ms"] < 1500


async def test_a_failed_rationale_leaves_the_probe_decision(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(error="engine fell over")])
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
    assert body["decision"] == "deny" and body["decided_by"] == "probe"
    assert not body["degraded"] and body["rationale"].startswith("Probe on layer 3")


async def test_a_prefill_fault_fails_closed(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(answer("allow"))])
    edge.prefill_error = "out of memory"
    async with fake_app({"edge": edge}, tiers=probe_tiers(probe_file(tmp_path))) as client:
        body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
        metrics = (await client.get("/metrics")).text
    assert body["decision"] == "escalate" and body["degraded"]
    assert body["reason"] == "model_error" and body["decided_by"] == "none"
    assert 'gatekeeper_decided_by_total{path="none",tier="edge"} 1.0' in metrics


async def test_a_probe_for_another_model_is_refused(tmp_path: Path) -> None:
    edge = HiddenFake(scripts=[Script(answer("deny", evidence=["R1"], history=[]))])
    path = probe_file(tmp_path, sha="cd" * 32)
    async with fake_app({"edge": edge}, tiers=probe_tiers(path)) as client:
        tiers = (await client.get("/readyz")).json()
        body = (await client.post("/evaluate", json=sample_request(tier="edge"))).json()
    edge_status = next(t for t in tiers["tiers"] if t["name"] == "edge")
    assert edge_status["state"] == "loaded"
    assert "probe refused" in edge_status["detail"] and "does not match" in edge_status["detail"]
    assert body["decided_by"] == "generation" and edge.prefills == []


def test_probe_files_check_model_and_prompt(tmp_path: Path) -> None:
    probes = ProbeSet.load(probe_file(tmp_path, prompt_version="p0+rollcall0"))
    with pytest.raises(ProbeMismatchError, match="prompt"):
        probes.check(SHA)
    with pytest.raises(ProbeMismatchError, match="does not match"):
        probes.check("00" * 32)
    broken = tmp_path / "broken.json"
    broken.write_text(json.dumps({"format": 99}))
    with pytest.raises(ConfigurationError, match="format"):
        ProbeSet.load(broken)


def test_probe_round_trips_and_calibrates() -> None:
    probe = LinearProbe(
        4, np.full(D, 1.0), np.full(D, 2.0), np.arange(D, dtype=float), -1.0, 0.5, 0.25
    )
    again = LinearProbe.from_json(json.loads(json.dumps(probe.to_json())))
    x = np.linspace(-1, 1, D)
    z = ((x - 1.0) / 2.0) @ np.arange(D) - 1.0
    assert again.prob(x) == pytest.approx(1 / (1 + np.exp(-(0.5 * z + 0.25))), rel=1e-5)


# ---- the real engine: llama.cpp's eval callback on SmolLM2-135M ------------------------------


@pytest.fixture(scope="module")
def smol() -> Any:
    from service.backends.llama_cpp import LlamaCppBackend
    from service.ops.weights import ModelStore
    from service.settings import load_settings

    name = "smollm2-135m-instruct-q4_1"
    path = ModelStore(load_settings()).resolve(name)
    backend = LlamaCppBackend(name, path, n_ctx=2048, n_threads=2, hidden_states=True)
    backend.load()
    yield backend
    backend.close()


def _built(action: str) -> Any:
    from service.decision.prompt import build_prompt
    from service.evidence import DEFAULT_PACK, PolicyLibrary
    from service.schemas import EvaluateRequest

    request = EvaluateRequest.model_validate(sample_request(action={"text": action}))
    pack = list(PolicyLibrary().get(DEFAULT_PACK).items)[:4]
    return build_prompt(
        request,
        pack,
        count_tokens=lambda text: len(text) // 3,
        max_prompt_tokens=1800,
        max_turn_chars=2000,
        roll_call=True,
    )


@pytest.mark.model
def test_llama_cpp_reads_hidden_states_at_the_marks(smol: Any) -> None:
    built = _built("rm -rf /home/*")
    layers = (3, 10, 20)
    states = smol.hidden_states(built.prompt, layers=layers, marks=built.marks, choices=("allow",))
    assert states.last.shape == (3, 576) and states.marks.shape == (3, 4, 576)
    assert np.isfinite(states.marks).all() and (np.abs(states.marks).sum(axis=2) > 0).all()
    assert 0 < states.choice_probs["allow"] < 1
    tokens = smol.tokenize_prompt(built.prompt)
    positions = smol._mark_positions(tokens, built.marks)
    for mark, pos in zip(built.marks, positions, strict=True):
        text = bytes(smol._llm.detokenize(tokens[: pos + 1], special=True)).decode()
        assert text.endswith(mark[-3:])  # the mark's last token
    # the same prompt again: the cached prefix is kept up to the first mark, and the states
    # read on the re-evaluated part equal the cold ones
    again = smol.hidden_states(built.prompt, layers=layers, marks=built.marks)
    assert 0 < again.cached_tokens <= min(positions)
    np.testing.assert_allclose(again.last, states.last, atol=2e-3)
    np.testing.assert_allclose(again.marks, states.marks, atol=2e-3)
    # a generation on the same prompt that follows starts from the cache
    from service.backends.base import GenerationRequest
    from service.decision.grammar import AnswerShape, build_constraint

    shape = AnswerShape((), (), 0, rationale_chars=40, revision_chars=20)
    generation = smol.generate(
        GenerationRequest(
            built.prompt, build_constraint(shape), max_tokens=30, deadline=time.monotonic() + 60
        )
    )
    assert generation.cached_tokens == generation.prompt_tokens - 1


@pytest.mark.model
def test_llama_cpp_averages_a_span_beside_the_marks(smol: Any) -> None:
    """`span`: the mean over the tokens after the first mark's end up to the second's (the
    proposed action, then the roll-call header), read in the same prefill as the marks; with
    no second mark it runs to the prompt's end."""
    from service.decision.prompt import ACTION_SPAN, ROLL_CALL_HEADER

    built = _built("rm -rf /home/*")
    states = smol.hidden_states(built.prompt, layers=(10, 20), marks=built.marks, span=ACTION_SPAN)
    assert states.span_mean.shape == (2, 576) and np.isfinite(states.span_mean).all()
    assert states.marks.shape == (2, len(built.marks), 576)
    tokens = smol.tokenize_prompt(built.prompt)
    opened, closed = smol._mark_positions(tokens, ACTION_SPAN)
    text = bytes(smol._llm.detokenize(tokens[opened + 1 : closed + 1], special=True)).decode()
    assert "rm -rf /home/*" in text and text.endswith(ROLL_CALL_HEADER)
    alone = smol.hidden_states(built.prompt, layers=(10, 20), marks=built.marks)
    assert alone.span_mean is None
    tol = 0.05 * float(np.abs(alone.marks).max())
    assert np.allclose(states.marks, alone.marks, atol=tol)  # the marks are not displaced
    to_end = smol.hidden_states(built.prompt, layers=(10, 20), span=(ACTION_SPAN[0], None))
    assert not np.allclose(to_end.span_mean, states.span_mean, atol=1e-3)
    # the running sum is the mean of the span's rows, each read as a mark would be
    every = list(range(opened + 1, closed + 1))
    marks_at = smol._mark_positions
    smol._mark_positions = lambda tokens, marks: (
        every if marks == ("*",) else marks_at(tokens, marks)
    )
    try:
        rows = smol.hidden_states(built.prompt, layers=(10, 20), marks=("*",)).marks
    finally:
        del smol._mark_positions
    assert rows.shape[1] == closed - opened
    assert np.allclose(rows.mean(axis=1), states.span_mean, atol=1e-3)  # a row off: ~3.7


@pytest.mark.model
@pytest.mark.parametrize("flash_attn", [False, True])
def test_llama_cpp_reads_up_to_a_mark_then_goes_on_from_the_cache(flash_attn: bool) -> None:
    """`until`: the prefill stops at the roll-call's header (the action's mean is read
    there); a call on the whole prompt then evaluates only the roll-call, and both read
    what one prefill of the whole prompt reads: exactly without flash attention; with it,
    llama.cpp's CPU kernel rounds differently for a different batch (1-3 % of the norm; on
    the edge model P(unsafe) moved by at most 0.009 over 16 held-out requests)."""
    from service.backends.llama_cpp import LlamaCppBackend
    from service.decision.prompt import ACTION_SPAN, PROFILE_HEADER, ROLL_CALL_HEADER
    from service.ops.weights import ModelStore
    from service.settings import load_settings

    name = "smollm2-135m-instruct-q4_1"
    path = ModelStore(load_settings()).resolve(name)
    smol = LlamaCppBackend(
        name, path, n_ctx=2048, n_threads=2, hidden_states=True, flash_attn=flash_attn
    )
    smol.load()
    try:
        built = _built("rm -rf /home/*")
        layers = (10, 20)
        whole = smol.hidden_states(built.prompt, layers=layers, marks=built.marks, span=ACTION_SPAN)
        tokens = smol.tokenize_prompt(built.prompt)
        _, closed = smol._mark_positions(tokens, ACTION_SPAN)
        first = smol.hidden_states(
            built.prompt, layers=layers, span=ACTION_SPAN, until=ROLL_CALL_HEADER
        )
        rest = smol.hidden_states(built.prompt, layers=layers, marks=built.marks)
        # shallow: the request's own tokens only up to block 20, and nothing of them cached
        shallow = smol.hidden_states(
            built.prompt,
            layers=layers,
            span=ACTION_SPAN,
            until=ROLL_CALL_HEADER,
            shallow_after=PROFILE_HEADER,
        )
        (profile_end,) = smol._mark_positions(tokens, (PROFILE_HEADER,))
        kept = smol._llm.n_tokens
        with pytest.raises(BackendError, match="no logits"):
            smol.hidden_states(
                built.prompt, layers=layers, choices=("allow",), shallow_after=PROFILE_HEADER
            )
        after = smol.hidden_states(built.prompt, layers=layers, marks=built.marks)
    finally:
        smol.close()
    # the cache ends where the request's own text starts, or where it was valid before
    assert kept == max(shallow.cached_tokens, profile_end + 1) < first.prompt_tokens
    assert after.cached_tokens == kept  # so the next read evaluates it again, whole
    assert shallow.prompt_tokens == first.prompt_tokens
    assert first.prompt_tokens == closed + 1 < len(tokens)
    assert first.marks.shape == (2, 0, 576)
    assert rest.cached_tokens == first.prompt_tokens  # only the roll-call is evaluated
    assert rest.prompt_tokens == len(tokens)

    def same(a: Any, b: Any) -> None:
        if flash_attn:
            assert np.linalg.norm(a - b) <= 0.05 * np.linalg.norm(b)
        else:
            np.testing.assert_array_equal(a, b)

    same(first.span_mean, whole.span_mean)
    same(shallow.span_mean, whole.span_mean)
    same(shallow.last, first.last)
    for k in range(len(built.marks)):
        same(rest.marks[:, k], whole.marks[:, k])
        same(after.marks[:, k], whole.marks[:, k])
    same(rest.last, whole.last)
    same(after.last, whole.last)


def test_the_generation_prompt_drops_only_the_roll_call() -> None:
    from service.decision.prompt import ROLL_CALL_HEADER

    built = _built("rm -rf /home/*")
    plain = built.without_roll_call()
    assert plain.marks == () and ROLL_CALL_HEADER not in plain.prompt.messages[-1].content
    assert plain.prompt.messages[:-1] == built.prompt.messages[:-1]
    assert plain.prompt.messages[-1].content.endswith("rm -rf /home/*")
    assert built.prompt.messages[-1].content.startswith(plain.prompt.messages[-1].content)
    assert plain.evidence == built.evidence and plain.history_ids == built.history_ids
    assert plain.without_roll_call() is plain


@pytest.mark.model
def test_llama_cpp_hidden_states_need_the_callback_and_valid_layers(smol: Any) -> None:
    built = _built("ls")
    with pytest.raises(BackendError, match="layers"):
        smol.hidden_states(built.prompt, layers=(smol.n_layers - 1,))
    assert len(smol.model_sha256) == 64


def test_the_shipped_edge_probe_matches_the_shipped_model_and_prompt() -> None:
    """A prompt change or a new default model makes the committed probe stale: the service
    would refuse it at load, so this fails first and says to re-train (docs/probes.md)."""
    from service.settings import load_settings

    settings = load_settings()
    edge = settings.tiers["edge"]
    # on by default (docs/probes.md: faster than generation, 90 % against 50 % on ASSEBench's
    # held-out part, no held-out hand-written unsafe request allowed)
    root = Path(__file__).parents[1]
    assert edge.probe_path == root / "models" / "probes" / f"{edge.model}.json"
    # the image carries it too, where tiers.toml's relative path does not reach
    dockerfile = (root / "Dockerfile").read_text()
    assert "COPY models/probes /etc/gatekeeper/probes" in dockerfile
    assert f"GATEKEEPER_TIERS__EDGE__PROBE=/etc/gatekeeper/probes/{edge.model}.json" in dockerfile
    probes = ProbeSet.load(root / "models" / "probes" / f"{edge.model}.json")
    assert probes.prompt_version == PROBE_PROMPT_VERSION
    assert probes.model == edge.model
    assert probes.model_sha256 == settings.models[edge.model].sha256
    probes.check(settings.models[edge.model].sha256 or "")
    assert 0.0 <= probes.allow_below <= probes.deny_above <= 1.0
    assert probes.relevance is not None
    assert probes.trained["part"] == "tuning"
    # trained beside ASSEBench on the hand-written pairs, never on the held-out set
    assert set(probes.trained["extra"]) == {"probe-actions-train-a", "probe-actions-train-b"}
    assert probes.decision_read == "action_mean"  # the read that generalised best
    # it cites the default pack from the same vector, so no request on it reads the roll-call
    from service.evidence import DEFAULT_PACK, PolicyLibrary

    assert probes.items is not None and probes.items.covers(PolicyLibrary().get(DEFAULT_PACK).items)
    assert probes.decides_before_roll_call
    # the guard reads the decision layer, with thresholds measured out of fold
    assert probes.guard.layer == probes.decision.layer
    assert probes.guard.max_distance < float("inf") and probes.guard.max_residual < float("inf")
    assert probes.guard.min_score < 0.0 < probes.guard.max_score
    assert 0.9 <= probes.trained["guard"]["oof_coverage"] <= 1.0
