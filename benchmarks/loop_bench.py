"""Measure the doom-loop detector on real model outputs (corpora from benchmarks/loop_corpus.py).

Labels come from an offline labeller that is independent of the detector: an output loops when
a block of 1-128 tokens repeats at least 3 times in a row over 16+ tokens, or a block of 4-400
characters repeats at least 3 times in a row, or it holds a run of 64+ blank characters. The
loop's "second period" ends where its second full copy ends. Manual corrections, if any, are in
benchmarks/data/label_overrides.json ({source: true|false}).

Prints recall on looping outputs, detection delay after the second period, the false-positive
rate on normal outputs, the detector's CPU cost per token against the edge model's decode time,
and the loop rate served through /evaluate with and without the detector (Gemma-3-270m and
SmolLM2 as the edge tier on agent records).

Then the loop families of `benchmarks.loop_families`, built from other people's agent text in
../shared/data/train and tokenised by the edge model: recall, share caught within the bound,
delay p50/p95/max per family; and the false positives on every real thought, message and tool
output, fed as an answer's rationale (JSON) and as free text, counted on the text that does not
hold a loop itself (an independent labeller), with the detector's cost per token on it.

    .venv/bin/python -m benchmarks.loop_bench [--served 20] [--families 200]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import re
import statistics
import time
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks import loop_families
from benchmarks.records import load_records, split
from service.decision.grammar import RESPONSE_PREFIX
from service.decision.pipeline import Gatekeeper
from service.decision.tiers import TierPool
from service.evidence import PolicyLibrary
from service.guards.loops import LoopDetector, LoopSettings
from service.ops.telemetry import Metrics
from service.settings import TierSettings, load_settings

ROOT = Path(__file__).resolve().parents[1]
DATA_DIR = ROOT / "benchmarks" / "data"
RECORDS = ROOT.parent / "shared" / "data" / "assebench" / "AgentJudge-security.json"
_TEXT_LOOP = re.compile(r"(.{4,400}?)\1{2,}", re.DOTALL)
# With digits masked, a block must be long enough to be more than an id with a shared prefix
# ("GK-01", "GK-02", ... is a legitimate list, not a loop).
_MASKED_LOOP = re.compile(r"(.{24,400}?)\1{2,}", re.DOTALL)


@dataclass
class Label:
    loops: bool
    second_period_end: int | None  # token index (exclusive) where the 2nd copy ends
    how: str


def label(ids: list[int], pieces: list[str]) -> Label:
    best: tuple[int, int] | None = None  # (second_period_end, period)
    for p in range(1, 129):
        run = 0
        for i in range(p, len(ids)):
            run = run + 1 if ids[i] == ids[i - p] else 0
            span = run + p
            if run >= 2 * p and span >= 16:
                onset = i - run + 1 - p
                candidate = (onset + 2 * p, p)
                if best is None or candidate[0] < best[0]:
                    best = candidate
                break
    text = "".join(pieces)
    starts, pos = [], 0
    for piece in pieces:
        starts.append(pos)
        pos += len(piece)

    def token_at(char: int) -> int:
        return next((i for i, s in enumerate(starts) if s >= char), len(pieces))

    # numbers are masked in a second look, so that a counting loop ("unsafe:\n11.",
    # "unsafe:\n12.", ...) counts; each digit stays one character, so offsets still hold
    match = _TEXT_LOOP.search(text) or _MASKED_LOOP.search(re.sub(r"\d", "#", text))
    blank = re.search(r"\s{64,}", text)
    chars = [m for m in (match, blank) if m is not None]
    text_end = None
    if match is not None:
        text_end = token_at(match.start() + 2 * len(match.group(1)))
    if blank is not None:
        blank_end = token_at(blank.start() + 64)
        text_end = blank_end if text_end is None else min(text_end, blank_end)
    if best is None and not chars:
        return Label(False, None, "")
    ends = [e for e in (best[0] if best else None, text_end) if e is not None]
    how = ("tokens" if best else "") + ("+text" if chars else "")
    return Label(True, min(ends), how)


def load(path: Path) -> list[dict[str, Any]]:
    return [json.loads(line) for line in path.read_text().splitlines() if line.strip()]


def replay(sample: dict[str, Any], settings: LoopSettings) -> tuple[int | None, str]:
    """(token index at which the detector fired, the loop's kind)."""
    detector = LoopDetector(settings)
    json_answer = "/json/" in sample["source"]
    if json_answer:
        detector.feed(-1, RESPONSE_PREFIX)  # as the service does
    fired, kind = None, ""
    for i, (token, piece) in enumerate(zip(sample["ids"], sample["pieces"], strict=True)):
        verdict = detector.feed(token, piece)
        if verdict is not None:
            fired, kind = i, verdict.kind.value
            break
    return fired, kind


def detector_figures(loops_path: Path, normal_path: Path) -> float:
    overrides: dict[str, bool] = {}
    override_file = DATA_DIR / "label_overrides.json"
    if override_file.is_file():
        overrides = json.loads(override_file.read_text())
    samples = [(s, "loop-corpus") for s in load(loops_path)] + [
        (s, "normal-corpus") for s in load(normal_path)
    ]
    settings = LoopSettings()
    positives, negatives, delays, misses, false_pos = 0, 0, [], [], []
    feed_s, fed = 0.0, 0
    for sample, _corpus in samples:
        lab = label(sample["ids"], sample["pieces"])
        looping = overrides.get(sample["source"], lab.loops)
        fired, kind = replay(sample, settings)
        # cost: every token of the output, as if the detector never fired
        full = LoopDetector(LoopSettings(**{**settings.__dict__, "enabled": True}))
        t0 = time.perf_counter()
        for token, piece in zip(sample["ids"], sample["pieces"], strict=True):
            full.feed(token, piece)
        feed_s += time.perf_counter() - t0
        fed += len(sample["ids"])
        if looping:
            positives += 1
            if fired is None:
                misses.append(sample["source"])
            elif lab.second_period_end is not None:
                delays.append(fired + 1 - lab.second_period_end)
        else:
            negatives += 1
            if fired is not None:
                false_pos.append((sample["source"], kind, "".join(sample["pieces"])[:120]))
    by_corpus = {c: sum(1 for s, k in samples if k == c) for c in ("loop-corpus", "normal-corpus")}
    print(
        f"corpora: {by_corpus['loop-corpus']} outputs from looping models, {by_corpus['normal-corpus']} from Qwen 0.5B/1.5B"
    )
    print(f"labelled looping: {positives}, not looping: {negatives}")
    recall = (positives - len(misses)) / positives if positives else float("nan")
    print(
        f"recall on looping outputs: {recall:.3f} ({positives - len(misses)}/{positives}; target >= 0.99)"
    )
    for source in misses:
        print(f"  missed: {source}")
    if delays:
        ordered = sorted(delays)
        p95 = ordered[int(0.95 * (len(ordered) - 1))]
        print(
            f"tokens after the second period until detection: median {statistics.median(delays):.0f}, "
            f"p95 {p95}, max {max(delays)} (target <= 32)"
        )
    fp_rate = len(false_pos) / negatives if negatives else float("nan")
    print(
        f"false positives on normal outputs: {fp_rate:.4f} ({len(false_pos)}/{negatives}; target <= 0.005)"
    )
    for source, kind, text in false_pos[:10]:
        print(f"  false positive {source} [{kind}]: {text!r}")
    per_token_us = feed_s / max(fed, 1) * 1e6
    print(f"detector cost: {per_token_us:.1f} us per token over {fed} tokens")
    return per_token_us


def decode_ms_per_token() -> float:
    """The edge model's free decode time per token, measured now on this machine."""
    from benchmarks.loop_corpus import _backend, _free

    backend = _backend("qwen2.5-coder-0.5b-instruct-q4_k_m")
    started = time.perf_counter()
    ids, _ = _free(backend, "Write a long story about a robot.", 64)
    first = time.perf_counter()
    ids, _ = _free(backend, "Write a long story about a robot.", 64)  # prompt now cached
    took = time.perf_counter() - first
    backend.close()
    del started
    return took / max(len(ids), 1) * 1000


async def served_loops(model: str, n: int) -> None:
    _, reporting = split(load_records(RECORDS))
    # long rationales give a looping model room to loop, as an operator might configure
    # n_ctx 4096: the prompt with two turns of history and the evidence no longer fits 2048
    tier = TierSettings(model=model, n_ctx=4096, max_tokens=320, rationale_chars=1000)
    for enabled in (False, True):
        settings = load_settings(
            load_tiers=["edge"], tiers={"edge": tier}, loops=LoopSettings(enabled=enabled)
        )
        metrics = Metrics()
        pool = TierPool(settings, metrics)
        await pool.load_all()
        gatekeeper = Gatekeeper(settings, pool, PolicyLibrary(), metrics)
        served_loop, detected, reasons = 0, 0, Counter[str]()
        for record in reporting[:n]:
            request = record.request.model_copy(
                # an hour: this measures loops, and on a loaded machine the latency model would
                # refuse slow requests as infeasible
                update={"history": record.request.history[-2:], "latency_budget_ms": 3_600_000}
            )
            answer = await gatekeeper.evaluate(request)
            detected += bool(answer.loops)
            if answer.degraded:
                reasons[str(answer.reason)] += 1
                continue
            served_text = answer.rationale + " " + json.dumps([e.id for e in answer.evidence])
            if _TEXT_LOOP.search(served_text) or re.search(r"\s{64,}", served_text):
                served_loop += 1
        pool.close()
        print(
            f"  {model} detector {'on ' if enabled else 'off'}: loops served {served_loop}/{n}, "
            f"loops detected {detected}, fail-closed {sum(reasons.values())} {dict(reasons)}"
        )


def _pct(ordered: list[int], q: float) -> int:
    return ordered[int(q * (len(ordered) - 1))]


def family_figures(n: int) -> None:
    texts = loop_families.load_texts()
    pool = loop_families.Pool(texts)
    vocab = loop_families.Vocabulary.edge()
    print(
        f"loop families, {n} loops each, from {len(texts.prose)} real thoughts and messages and "
        f"{len(texts.tools)} tool outputs (../shared/data/train), Qwen2.5-Coder tokens:"
    )
    print(f"  {'family':22s} recall  in bound  delay p50  p95  max  (bound)  kinds")
    for family, build in loop_families.FAMILIES.items():
        rng = random.Random(f"bench-{family}")
        delays, in_bound, kinds = [], 0, Counter[str]()
        bound = 0
        for _ in range(n):
            loop = build(rng, pool)
            bound = loop.bound
            result = loop_families.replay(loop, vocab)
            if result.fired is None or result.delay is None:
                continue
            delays.append(result.delay)
            in_bound += result.delay <= loop.bound
            kinds[result.fired.kind.value] += 1
        ordered = sorted(delays)
        print(
            f"  {family:22s} {len(delays) / n:6.3f}  {in_bound / n:8.3f}  {_pct(ordered, 0.5):9d}"
            f"  {_pct(ordered, 0.95):3d}  {ordered[-1]:3d}  ({bound})  {dict(kinds.most_common(3))}"
        )
    fed, took = 0, 0.0
    for name, items in (("prose", texts.prose), ("tool outputs", texts.tools)):
        for as_json in (True, False):
            fired, clean, labelled, labelled_fired = Counter[str](), 0, 0, 0
            for text in items:
                started = time.perf_counter()
                verdict, tokens = loop_families.feed_text(text, vocab, as_json)
                took += time.perf_counter() - started
                fed += tokens
                if loop_families.holds_loop(text):
                    labelled += 1
                    labelled_fired += verdict is not None
                    continue
                clean += 1
                if verdict is not None:
                    fired[verdict.kind.value] += 1
            form = "as a JSON rationale" if as_json else "as free text"
            print(
                f"  false positives on real {name} {form}: {sum(fired.values()) / clean:.4f} "
                f"({sum(fired.values())}/{clean}; {dict(fired)}); {labelled_fired}/{labelled} "
                "of the texts that loop themselves fired"
            )
    print(f"  (tokenising and feeding the real text: {took / fed * 1e6:.1f} us per token)")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--loops", type=Path, default=DATA_DIR / "loops.jsonl")
    parser.add_argument("--normal", type=Path, default=DATA_DIR / "normal.jsonl")
    parser.add_argument(
        "--served", type=int, default=20, help="records per model for the /evaluate run"
    )
    parser.add_argument(
        "--families", type=int, default=200, help="loops per family (0: skip the families)"
    )
    args = parser.parse_args()
    if args.families:
        family_figures(args.families)
    per_token_us = detector_figures(args.loops, args.normal)
    decode_ms = decode_ms_per_token()
    print(
        f"edge decode {decode_ms:.1f} ms per token: detector cost {per_token_us / 1000 / decode_ms:.2%} of decode (target < 1%)"
    )
    if args.served:
        print("loop rate served through /evaluate (reporting records, rationale up to 1000 chars):")
        for model in ("gemma-3-270m-q4_k_m", "smollm2-135m-instruct-q4_1"):
            asyncio.run(served_loops(model, args.served))


if __name__ == "__main__":
    main()
