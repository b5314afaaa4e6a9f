"""The OpenAI-compatible backend's overhead over calling the engine directly.

Starts llama-cpp-python's server on loopback with SmolLM2-135M (or uses --url), then sends the
same prompt, schema and sampling N times each way, interleaved so that engine drift hits both
sides alike: directly (one httpx stream, read to the end) and through
`OpenAICompatibleBackend.generate` with the service's own token hook (the loop detector and
the completeness check). Temperature 0 and the engine's prompt cache make both sides do the
same work. Prints p50/p95 of both and the overhead; the target is <= 10 ms at p50.

    .venv/bin/python -m benchmarks.remote_overhead [--requests 20] [--url http://...:8000/v1]
"""

from __future__ import annotations

import argparse
import json
import statistics
import time
from collections.abc import Callable, Iterator
from contextlib import contextmanager, nullcontext
from typing import Any

import httpx

from service.backends.base import ChatMessage, GenerationRequest, Prompt
from service.backends.openai import OpenAICompatibleBackend
from service.decision.grammar import RESPONSE_PREFIX, AnswerShape, build_constraint
from service.decision.verify import is_complete
from service.guards.loops import LoopDetector, LoopSettings
from service.ops.weights import ModelStore
from service.settings import load_settings

SHAPE = AnswerShape(("GK-04",), (1,), max_cited=1, rationale_chars=80, revision_chars=40)
PROMPT = Prompt(
    (
        ChatMessage("system", "You judge an AI agent's proposed action. Answer in JSON."),
        ChatMessage(
            "user",
            "## Evidence\n[GK-04] Deleting, overwriting or bulk-modifying files needs the "
            "user's explicit confirmation.\n## History\n[1] user: my disk is full\n"
            "## Proposed action\nshell: rm -rf /home/alice/*",
        ),
    ),
    RESPONSE_PREFIX,
)


def _pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, round(q * (len(ordered) - 1)))]


def direct(
    client: httpx.Client, body: dict[str, Any], record: list[str] | None = None
) -> tuple[float, int]:
    """One streamed request straight to the engine; (seconds, content pieces)."""
    started = time.perf_counter()
    pieces = 0
    with client.stream("POST", "/chat/completions", json=body) as response:
        response.raise_for_status()
        for line in response.iter_lines():
            if line.startswith("data:"):
                data = line[5:].strip()
                if record is not None:
                    record.append(data)
                if data != "[DONE]":
                    event = json.loads(data)
                    pieces += sum(1 for c in event["choices"] if c["delta"].get("content"))
    return time.perf_counter() - started, pieces


def through_backend(backend: OpenAICompatibleBackend, max_tokens: int) -> tuple[float, int]:
    detector = LoopDetector(LoopSettings())
    detector.feed(-1, RESPONSE_PREFIX)
    text = RESPONSE_PREFIX

    def on_token(token: int, piece: str) -> bool:  # what decision/generation.py runs on every piece
        nonlocal text
        text += piece
        return detector.feed(token, piece) is not None or is_complete(text)

    request = GenerationRequest(PROMPT, build_constraint(SHAPE), max_tokens, time.monotonic() + 120)
    started = time.perf_counter()
    generation = backend.generate(request, on_token)
    return time.perf_counter() - started, generation.completion_tokens


@contextmanager
def local_engine() -> Iterator[str]:
    from tests.realserver import llama_cpp_server  # the same loopback engine the tests use

    path = ModelStore(load_settings()).resolve("smollm2-135m-instruct-q4_1")
    with llama_cpp_server(path, alias="smollm2") as (url, _proc):
        yield url


def measure(url: str, args: argparse.Namespace, record: list[str] | None = None) -> None:
    """N requests each way against the engine at `url`, interleaved; print the figures."""
    backend = OpenAICompatibleBackend(args.model, url, response_format=args.response_format)
    backend.load()
    request = GenerationRequest(
        PROMPT, build_constraint(SHAPE), args.max_tokens, time.monotonic() + 120
    )
    body = backend._body(request)
    side: dict[str, list[float]] = {"direct": [], "backend": []}
    tokens: dict[str, list[int]] = {"direct": [], "backend": []}
    with httpx.Client(base_url=url, timeout=120) as client:
        for _ in range(2):  # warm-up: grammar compiled, prompt cached, connections open
            direct(client, body, record)
            record = None
            through_backend(backend, args.max_tokens)
        for i in range(args.requests):
            runs: list[tuple[str, Callable[[], tuple[float, int]]]] = [
                ("direct", lambda: direct(client, body))
            ]
            runs.append(("backend", lambda: through_backend(backend, args.max_tokens)))
            for name, run in runs if i % 2 == 0 else runs[::-1]:
                seconds, count = run()
                side[name].append(seconds)
                tokens[name].append(count)
    backend.close()
    paired = [b - d for b, d in zip(side["backend"], side["direct"], strict=True)]
    for name in ("direct", "backend"):
        values = side[name]
        print(
            f"  {name:8s} p50 {_pct(values, 0.5) * 1000:8.1f} ms   "
            f"p95 {_pct(values, 0.95) * 1000:8.1f} ms   "
            f"pieces/request {statistics.mean(tokens[name]):.1f}"
        )
    p50 = (_pct(side["backend"], 0.5) - _pct(side["direct"], 0.5)) * 1000
    p95 = (_pct(side["backend"], 0.95) - _pct(side["direct"], 0.95)) * 1000
    print(f"  overhead p50 {p50:+.1f} ms   p95 {p95:+.1f} ms   (target: <= 10 ms at p50)")
    print(
        f"  paired (backend - direct) p50 {_pct(paired, 0.5) * 1000:+.1f} ms   "
        f"p95 {_pct(paired, 0.95) * 1000:+.1f} ms"
    )


def main() -> None:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--requests", type=int, default=30)
    parser.add_argument("--max-tokens", type=int, default=24)
    parser.add_argument("--url", help="an engine's /v1 root (default: start one on loopback)")
    parser.add_argument("--model", default="smollm2")
    parser.add_argument("--response-format", default="json_object")
    args = parser.parse_args()
    recorded: list[str] = []
    with nullcontext(args.url) if args.url else local_engine() as url:
        print(f"engine {url} ({args.model}), {args.requests} requests each way, interleaved")
        measure(url, args, recorded)
    # The engine's own answer replayed by a loopback server at once: the engine's time and
    # its jitter drop out, what is left is the client side (HTTP, SSE, the token hook).
    from tests.scripted_engine import Reply, scripted_engine

    with scripted_engine(Reply(recorded)) as (replay_url, _):
        print(f"the same stream replayed from {replay_url}")
        measure(replay_url, args)


if __name__ == "__main__":
    main()
