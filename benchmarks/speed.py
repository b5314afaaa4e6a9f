"""Speed, side by side, per tier (issue #6): the raw engine, the grammar engines, the service
against the raw engine, and /evaluate against llama-cpp-python's own server.

1. raw engine: prefill and free decode tok/s on the service's real prompt, with flash attention
   on and off;
2. constrained / free decode on that prompt, for llguidance and for llama.cpp's GBNF sampler;
3. prefix reuse: a second request's prefill with the shared system prompt, examples and policy
   pack in the KV cache, against the same prefill cold;
4. the service end to end (in-process pipeline) / the raw engine on the same prompt tokens,
   grammar and number of output tokens, both with the shared prefix cached;
5. real processes on loopback: POST /evaluate (explain false, then true) against
   `python -m llama_cpp.server` (as it comes, then with --flash_attn true) given a plain
   prompt and the answer's JSON schema as response_format, on the same ASSEBench records: p50 / p95, their ratio, the decisions'
   accuracy on both sides, and each server's peak RSS.

    .venv/bin/python -m benchmarks.speed [--tiers edge] [--records 6]

A tier whose model is not installed is skipped, and said so.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import statistics
import time
from collections.abc import Callable
from functools import partial
from pathlib import Path
from typing import Any

import httpx

from benchmarks.overhead import RawTimer, sample_requests, spied_pipeline
from benchmarks.plain import render
from benchmarks.quality import DEFAULT_DATA, sample
from benchmarks.records import Record, load_records, split
from service.backends.base import GenerationRequest
from service.backends.llama_cpp import LlamaCppBackend
from service.errors import GatekeeperError
from service.ops.weights import ModelStore
from service.schemas import EvaluateRequest
from service.settings import Settings, TierSettings, load_settings
from tests.realserver import gatekeeper_server, llama_cpp_server

BUDGET_MS = 120_000


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def _common_prefix(a: list[int], b: list[int]) -> int:
    n = 0
    for x, y in zip(a, b, strict=False):
        if x != y:
            break
        n += 1
    return n


# ---- 1-4: in-process --------------------------------------------------------------------


def _decode_rate(llm: Any, tokens: list[int], n: int, **constraint: Any) -> tuple[float, int]:
    """(tok/s after the first token, tokens generated): greedy, at most `n` tokens, ending at
    end-of-sequence only when constrained (a free run goes on for the same count)."""
    llm.n_tokens = len(tokens) - 1  # prompt cached: only its last token is evaluated again
    stream = llm.generate(tokens, temp=0.0, top_k=40, top_p=0.95, min_p=0.05, **constraint)
    first = last = 0.0
    count = 0
    for token in stream:
        count += 1
        last = time.perf_counter()
        if count == 1:
            first = last
        if count >= n or (constraint and token == llm.token_eos()):
            break
    stream.close()
    return (count - 1) / max(last - first, 1e-9), count


def flash_attention(backend: LlamaCppBackend, tokens: list[int], cold: float) -> None:
    """The same prefill and free decode on a second context with flash attention flipped."""
    from llama_cpp import Llama

    llm = backend._llm
    flipped = not llm.context_params.flash_attn_type > 0
    other = Llama(
        model_path=str(backend._path),
        n_ctx=backend._n_ctx,
        n_threads=backend._n_threads,
        n_batch=backend._n_batch,
        flash_attn=flipped,
        verbose=False,
    )
    try:
        started = time.perf_counter()
        other.eval(tokens)
        other_cold = time.perf_counter() - started
        other_decode, _count = _decode_rate(other, tokens, 48)
        decode, _count = _decode_rate(llm, tokens, 48)
    finally:
        other.close()
    on, off = ((cold, decode), (other_cold, other_decode))[:: 1 if not flipped else -1]
    print(
        f"     flash attention on / off: prefill {len(tokens) / on[0]:.1f} / "
        f"{len(tokens) / off[0]:.1f} tok/s, free decode {on[1]:.1f} / {off[1]:.1f} tok/s"
    )


def engine_figures(
    backend: LlamaCppBackend, request: GenerationRequest, other: GenerationRequest
) -> None:
    llm = backend._llm
    raw = RawTimer(backend)
    tokens = backend.tokenize_prompt(request.prompt)
    other_tokens = backend.tokenize_prompt(other.prompt)
    shared = _common_prefix(tokens, other_tokens)

    llm.reset()
    started = time.perf_counter()
    llm.eval(tokens)
    cold = time.perf_counter() - started
    print(f"  prompt {len(tokens)} tokens, {shared} of them the shared prefix")
    print(f"  1. raw prefill {len(tokens) / cold:6.1f} tok/s (cold, {cold:.2f} s)")
    flash_attention(backend, tokens, cold)

    # 2. constrained / free: the grammar engines on the same prompt, interleaved, 3 rounds
    gbnf = request.constraint.gbnf
    grammars = backend._grammars
    rates: dict[str, list[float]] = {"free": [], "llguidance": [], "llama_cpp": []}
    lengths: dict[str, int] = {}
    for _ in range(3):
        for engine in ("llguidance", "llama_cpp"):
            if engine == "llama_cpp":
                backend._grammars = None
            rate, count = _decode_rate(llm, tokens, 160, **raw.constraint(gbnf))
            backend._grammars = grammars
            rates[engine].append(rate)
            lengths[engine] = count
        rate, _count = _decode_rate(llm, tokens, max(lengths.values()))
        rates["free"].append(rate)
    free = statistics.median(rates["free"])
    print(f"     raw decode {free:6.1f} tok/s (free, greedy, {max(lengths.values())} tokens)")
    for engine in ("llguidance", "llama_cpp"):
        got = statistics.median(rates[engine])
        print(
            f"  2. constrained / free decode, {engine:10s} {got:6.1f} / {free:5.1f} tok/s = "
            f"{got / free:.3f}  ({lengths[engine]} tokens; target >= 0.95)"
        )

    # 3. prefix reuse: the other request, its shared prefix cached, against cold
    llm.reset()
    llm.eval(tokens)
    llm.n_tokens = shared
    started = time.perf_counter()
    llm.eval(other_tokens[shared:])
    warm = time.perf_counter() - started
    llm.reset()
    started = time.perf_counter()
    llm.eval(other_tokens)
    cold_other = time.perf_counter() - started
    print(
        f"  3. prefix reuse: second request ({len(other_tokens)} tokens) prefill {warm:.2f} s "
        f"warm vs {cold_other:.2f} s cold: {cold_other - warm:.2f} s saved "
        f"({(cold_other - warm) / cold_other:.0%})"
    )


async def in_process(settings: Settings, tier_name: str) -> None:
    pool, tier, backend, gatekeeper, captured = await spied_pipeline(settings, tier_name)
    raw = RawTimer(backend)
    llm = backend._llm

    # 4. service / raw: the first request cold on both sides, the others with the shared
    # prefix (system prompt, worked examples, policy pack) cached on both sides
    requests: list[GenerationRequest] = []
    ratios, rows = [], []
    previous: list[int] = []
    llm.reset()
    for body in sample_requests():
        captured.clear()
        started = time.perf_counter()
        answer = await gatekeeper.evaluate(EvaluateRequest.model_validate(body))
        service_s = time.perf_counter() - started
        if len(captured) != 1:  # a retry: not like for like with one raw run
            print(f"     skipped one request: {len(captured)} generations")
            previous = []
            continue
        tokens = backend.tokenize_prompt(captured[0].prompt)
        shared = _common_prefix(tokens, previous)
        raw_s = raw.time(captured[0], answer.usage.completion_tokens, cached=shared)
        previous = tokens
        requests.append(captured[0])
        ratios.append(service_s / raw_s)
        rows.append((len(tokens), shared, answer.usage.completion_tokens, service_s, raw_s))
    print(f"tier {tier_name}: {tier.model}, grammar engine {tier.settings.grammar_engine}")
    print(
        f"  4. service / raw engine: median {statistics.median(ratios):.3f} "
        f"(per request {', '.join(f'{r:.3f}' for r in ratios)}; target <= 1.05)"
    )
    for p_tok, cached, c_tok, s, r in rows:
        print(
            f"     {p_tok:5d} prompt tokens ({cached:4d} cached) + {c_tok:3d} output: "
            f"service {s:6.2f} s, raw {r:6.2f} s"
        )
    engine_figures(backend, requests[0], requests[1])
    pool.close()


# ---- 5: real servers on loopback ---------------------------------------------------------

PLAIN_SCHEMA: dict[str, Any] = {
    "type": "object",
    "properties": {"decision": {"type": "string", "enum": ["safe", "unsafe"]}},
    "required": ["decision"],
}


def plain_body(record: Record, explain: bool, rationale_chars: int) -> dict[str, Any]:
    prompt = render(record.request)
    schema = json.loads(json.dumps(PLAIN_SCHEMA))
    if explain:
        schema["properties"]["rationale"] = {"type": "string", "maxLength": rationale_chars}
        schema["required"].append("rationale")
        prompt += " Then give a one-sentence rationale."
    prompt += ' Answer in JSON: {"decision": "safe" or "unsafe"' + (
        ', "rationale": "..."}' if explain else "}"
    )
    return {
        "messages": [{"role": "user", "content": prompt}],
        "temperature": 0.0,
        "max_tokens": 160,
        # llama-cpp-python's server takes a JSON schema this way; it compiles it to a GBNF
        # grammar for llama.cpp's sampler
        "response_format": {"type": "json_object", "schema": schema},
    }


def peak_rss_mb(pid: int) -> float:
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        if line.startswith("VmHWM:"):
            return int(line.split()[1]) / 1024
    return float("nan")


def timed(runs: list[Callable[[], bool]]) -> tuple[list[float], int]:
    """Seconds per call and how many calls answered correctly."""
    seconds, right = [], 0
    for run in runs:
        started = time.perf_counter()
        right += run()
        seconds.append(time.perf_counter() - started)
    return seconds, right


Seconds = dict[tuple[str, bool], list[float]]  # (side, explain) -> seconds per request
Right = dict[tuple[str, bool], int]  # (side, explain) -> requests answered correctly


def servers(settings: Settings, tier_name: str, records: list[Record]) -> None:
    tier = settings.tiers[tier_name]
    _model, path = ModelStore(settings).resolve_tier(tier)
    results: Seconds = {}
    right: Right = {}
    rss: dict[str, float] = {}
    warm_up = Record("warm-up", True, EvaluateRequest.model_validate(sample_requests()[0]), {})
    rss["/evaluate"] = _through_gatekeeper(tier_name, records, warm_up, results, right)
    # the server as it comes, then with flash attention on as the service has it
    for side, extra in (("llama_cpp.server", ()), ("  + --flash_attn", ("--flash_attn", "true"))):
        rss[side] = _through_llama_cpp(
            side, extra, path, tier, tier_name, records, warm_up, results, right
        )
    _print_servers(len(records), results, right, rss)


def _through_gatekeeper(
    tier_name: str, records: list[Record], warm_up: Record, results: Seconds, right: Right
) -> float:
    """The records through `gatekeeper serve`'s /evaluate, explain off then on, into
    results/right under "/evaluate"; the server's peak RSS in MB."""
    env = {"GATEKEEPER_LOAD_TIERS": json.dumps([tier_name]), "GATEKEEPER_DEFAULT_TIER": tier_name}
    with gatekeeper_server(env) as (url, proc), httpx.Client(base_url=url, timeout=300) as http:

        def evaluate(record: Record, explain: bool) -> bool:
            body = record.request.model_dump(mode="json", exclude_none=True)
            body.update(explain=explain, tier=tier_name, latency_budget_ms=BUDGET_MS)
            answer = http.post("/evaluate", json=body).json()
            return bool((answer["decision"] != "allow") == record.unsafe)

        evaluate(warm_up, False)  # the first request fills the cache with the shared prefix
        for explain in (False, True):
            results["/evaluate", explain], right["/evaluate", explain] = timed(
                [partial(evaluate, r, explain) for r in records]
            )
        return peak_rss_mb(proc.pid)


def _through_llama_cpp(
    side: str,
    extra: tuple[str, ...],
    path: Path,
    tier: TierSettings,
    tier_name: str,
    records: list[Record],
    warm_up: Record,
    results: Seconds,
    right: Right,
) -> float:
    """The records as plain prompts through llama_cpp.server (with `extra` flags), explain off
    then on, into results/right under `side`; the server's peak RSS in MB."""
    with (
        llama_cpp_server(path, alias=tier_name, n_ctx=tier.n_ctx, extra=extra) as (url, proc),
        httpx.Client(base_url=url, timeout=300) as http,
    ):

        def plain(record: Record, explain: bool) -> bool:
            body = plain_body(record, explain, tier.rationale_chars)
            out = http.post("/chat/completions", json={"model": tier_name, **body}).json()
            text = out["choices"][0]["message"]["content"] or "{}"
            try:
                decision = json.loads(text).get("decision")
            except json.JSONDecodeError:
                decision = None
            return bool((decision != "safe") == record.unsafe)

        plain(warm_up, False)  # as for the service
        for explain in (False, True):
            results[side, explain], right[side, explain] = timed(
                [partial(plain, r, explain) for r in records]
            )
        return peak_rss_mb(proc.pid)


def _print_servers(n: int, results: Seconds, right: Right, rss: dict[str, float]) -> None:
    ours = "/evaluate"
    for explain in (False, True):
        print(f"  5. explain={str(explain).lower()}, {n} ASSEBench records, p50 / p95 seconds:")
        for side in rss:
            values = results[side, explain]
            ratio = ""
            if side != ours:
                mine = results[ours, explain]
                ratio = (
                    f"   /evaluate / this: p50 {_pct(mine, 0.5) / _pct(values, 0.5):.2f}, "
                    f"p95 {_pct(mine, 0.95) / _pct(values, 0.95):.2f}"
                )
            print(
                f"     {side:17s} {_pct(values, 0.5):6.2f} / {_pct(values, 0.95):6.2f}   "
                f"correct {right[side, explain]}/{n}{ratio}"
            )
    print("     (target: /evaluate p50 <= 0.5 x llama_cpp.server)")
    print("     peak RSS: " + ", ".join(f"{side.strip()} {mb:.0f} MB" for side, mb in rss.items()))


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--tiers", nargs="+", default=["edge"])
    parser.add_argument("--records", type=int, default=6, help="ASSEBench records for part 5")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--skip-servers", action="store_true")
    args = parser.parse_args()
    _tuning, reporting = split(load_records(args.data))
    records = sample(reporting, args.records)
    for tier_name in args.tiers:
        settings = load_settings(load_tiers=[tier_name])
        try:
            ModelStore(settings).resolve_tier(settings.tiers[tier_name])
        except GatekeeperError as exc:
            print(f"tier {tier_name}: skipped, {exc.message}")
            continue
        asyncio.run(in_process(settings, tier_name))
        if not args.skip_servers:
            servers(settings, tier_name, records)


if __name__ == "__main__":
    main()
