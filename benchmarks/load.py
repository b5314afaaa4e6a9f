"""Load generator for latency-budget routing: the real server, the real edge and mid models.

Starts `gatekeeper serve` as a separate process on loopback with the edge and mid tiers, then
sends agent records (../shared/data, reporting part, last turns only) at concurrency 1, 4 and
16 with a mix of budgets: tight, medium, generous and infeasible. Bounded in count and time.
Prints per tier p50/p95/p99 latency, the share of answers within budget + 50 ms, fail-closed
answers by reason, throughput, and checks the targets.

    .venv/bin/python -m benchmarks.load [--requests 12,24,48] [--max-seconds 900]
"""

from __future__ import annotations

import argparse
import asyncio
import itertools
import json
import random
import time
from collections import Counter, defaultdict
from pathlib import Path
from typing import Any

import httpx

from benchmarks.records import load_records, split
from tests.realserver import gatekeeper_server

ROOT = Path(__file__).resolve().parents[1]
RECORDS = ROOT.parent / "shared" / "data" / "assebench" / "AgentJudge-security.json"
BUDGETS_MS = {"infeasible": 30, "tight": 4_000, "medium": 15_000, "generous": 60_000}


def pct(values: list[float], q: float) -> float:
    ordered = sorted(values)
    return ordered[min(len(ordered) - 1, int(q * len(ordered)))] if ordered else float("nan")


def requests_pool() -> list[dict[str, Any]]:
    _, reporting = split(load_records(RECORDS))
    bodies = []
    for record in reporting:
        request = record.request.model_copy(update={"history": record.request.history[-3:]})
        bodies.append(request.model_dump(mode="json", exclude_none=True))
    return bodies


async def one(client: httpx.AsyncClient, body: dict[str, Any], budget: str) -> dict[str, Any]:
    body = {**body, "latency_budget_ms": BUDGETS_MS[budget]}
    body.pop("request_id", None)
    started = time.perf_counter()
    response = await client.post("/evaluate", json=body)
    elapsed_ms = (time.perf_counter() - started) * 1000
    answer = response.json()
    return {
        "status": response.status_code,
        "budget": budget,
        "budget_ms": BUDGETS_MS[budget],
        "elapsed_ms": elapsed_ms,
        **{k: answer.get(k) for k in ("tier", "decision", "degraded", "reason", "route")},
    }


async def level(
    url: str, concurrency: int, count: int, bodies: list[dict[str, Any]], deadline: float
) -> list[dict[str, Any]]:
    rng = random.Random(concurrency)
    mix = itertools.cycle(["tight", "medium", "generous", "infeasible"])
    jobs = [(rng.choice(bodies), next(mix)) for _ in range(count)]
    results: list[dict[str, Any]] = []
    queue: asyncio.Queue[tuple[dict[str, Any], str]] = asyncio.Queue()
    for job in jobs:
        queue.put_nowait(job)

    async def worker(client: httpx.AsyncClient) -> None:
        while time.monotonic() < deadline:
            try:
                body, budget = queue.get_nowait()
            except asyncio.QueueEmpty:
                return
            results.append(await one(client, body, budget))

    limits = httpx.Limits(max_connections=concurrency)
    async with httpx.AsyncClient(base_url=url, timeout=120, limits=limits) as client:
        await asyncio.gather(*(worker(client) for _ in range(concurrency)))
    return results


def report(concurrency: int, results: list[dict[str, Any]], wall_s: float) -> dict[str, Any]:
    by_tier: dict[str, list[float]] = defaultdict(list)
    for r in results:
        by_tier[r["tier"] or "-"].append(r["elapsed_ms"])
    print(
        f"\nconcurrency {concurrency}: {len(results)} requests in {wall_s:.0f} s, "
        f"throughput {len(results) / wall_s:.2f} req/s"
    )
    print(f"  {'tier':<6} {'n':>4} {'p50 ms':>8} {'p95 ms':>8} {'p99 ms':>8}")
    for tier, values in sorted(by_tier.items()):
        print(
            f"  {tier:<6} {len(values):>4} {pct(values, 0.5):>8.0f} {pct(values, 0.95):>8.0f} {pct(values, 0.99):>8.0f}"
        )
    within = [r for r in results if r["elapsed_ms"] <= r["budget_ms"] + 50]
    print(f"  within budget + 50 ms: {len(within) / len(results):.1%}")
    degraded = [r for r in results if r["degraded"]]
    reasons = Counter(r["reason"] for r in degraded)
    print(
        f"  fail-closed: {len(degraded) / len(results):.1%} "
        + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
    )
    by_budget = Counter((r["budget"], "degraded" if r["degraded"] else "answered") for r in results)
    print("  by budget: " + ", ".join(f"{b}/{k} {v}" for (b, k), v in sorted(by_budget.items())))
    routes = Counter((r["route"] or {}).get("kind") for r in results)
    print("  routes: " + ", ".join(f"{k} {v}" for k, v in routes.most_common()))
    infeasible = [r["elapsed_ms"] for r in results if r["budget"] == "infeasible"]
    allow_degraded = sum(1 for r in degraded if r["decision"] == "allow")
    errors = sum(1 for r in results if r["status"] != 200)
    print(
        f"  infeasible answered in max {max(infeasible, default=0):.0f} ms; allow among degraded: {allow_degraded}; non-200: {errors}"
    )
    return {
        "n": len(results),
        "within": len(within),
        "infeasible_max_ms": max(infeasible, default=0.0),
        "allow_degraded": allow_degraded,
        "errors": errors,
    }


async def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--requests", default="12,24,48", help="requests at concurrency 1,4,16")
    parser.add_argument("--max-seconds", type=float, default=900, help="stop sending after this")
    args = parser.parse_args()
    counts = [int(n) for n in args.requests.split(",")]
    bodies = requests_pool()
    env = {"GATEKEEPER_LOAD_TIERS": '["edge", "mid"]', "GATEKEEPER_LOG_LEVEL": "warning"}
    totals: list[dict[str, Any]] = []
    with gatekeeper_server(env, ready_timeout=600) as (url, _proc):
        async with httpx.AsyncClient(base_url=url) as probe:
            ready = (await probe.get("/readyz")).json()
        print("tiers: " + ", ".join(f"{t['name']}={t['state']}" for t in ready["tiers"]))
        stop_at = time.monotonic() + args.max_seconds
        for concurrency, count in zip((1, 4, 16), counts, strict=True):
            started = time.monotonic()
            results = await level(url, concurrency, count, bodies, stop_at)
            if results:
                totals.append(report(concurrency, results, time.monotonic() - started))
        async with httpx.AsyncClient(base_url=url) as probe:
            metrics = (await probe.get("/metrics")).text
    n = sum(t["n"] for t in totals)
    within = sum(t["within"] for t in totals)
    print(f"\nall: {within}/{n} = {within / max(n, 1):.1%} within budget + 50 ms (target >= 99%)")
    print(
        f"infeasible answered in <= {max(t['infeasible_max_ms'] for t in totals):.0f} ms (target <= 50 ms)"
    )
    print(f"allow among degraded answers: {sum(t['allow_degraded'] for t in totals)} (target 0)")
    misses = [
        line for line in metrics.splitlines() if line.startswith("gatekeeper_budget_misses_total")
    ]
    print("server budget misses: " + (", ".join(misses) or "none"))
    print(json.dumps({"requests": n, "within_budget": within}))


if __name__ == "__main__":
    asyncio.run(main())
