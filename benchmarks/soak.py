"""Soak: the real server and the real edge model under a bounded loopback load for a long while.

Starts `gatekeeper serve` as its own process (edge tier only), measures the rate it sustains
one request at a time, then sends requests as a Poisson stream at `--rate-factor` times that
rate (default 2x) for `--minutes` (default 30). Requests are agent records of the reporting
part of ../shared/data (last turns only), half with an explanation, each with a latency budget.
Every `--sample-s` seconds it reads the server's resident memory from /proc. Prints RSS over
time (growth after warm-up; target < 5 %), the 5xx count (target 0), the share answered within
budget, the fail-closed and rejected shares and allows among degraded answers (target 0), and
plots RSS and latency over time.

    .venv/bin/python -m benchmarks.soak [--minutes 30] [--out docs/img/soak.png]
"""

from __future__ import annotations

import argparse
import asyncio
import json
import random
import time
from collections import Counter
from pathlib import Path
from typing import Any

import httpx

from benchmarks.load import RECORDS, pct, requests_pool
from tests.realserver import gatekeeper_server

ROOT = Path(__file__).resolve().parents[1]
__all__ = ["RECORDS", "soak"]


def memory_mb(pid: int) -> dict[str, float]:
    """The process's resident set, whole and split, from /proc (Linux): `anon` is heap
    (Python's, glibc's arenas, llama.cpp's buffers), `file` the mapped pages of files (the
    model's weights are mmapped: pages count once touched, and the kernel can drop them)."""
    fields = {"VmRSS:": "rss", "RssAnon:": "anon", "RssFile:": "file"}
    out = dict.fromkeys(fields.values(), float("nan"))
    for line in Path(f"/proc/{pid}/status").read_text().splitlines():
        key = line.split(maxsplit=1)[0] if line else ""
        if key in fields:
            out[fields[key]] = int(line.split()[1]) / 1024
    return out


def rss_mb(pid: int) -> float:
    """The process's resident set size, from /proc (Linux)."""
    return memory_mb(pid)["rss"]


async def send(
    client: httpx.AsyncClient, body: dict[str, Any], budget_ms: int, t0: float
) -> dict[str, Any]:
    started = time.monotonic()
    try:
        response = await client.post("/evaluate", json={**body, "latency_budget_ms": budget_ms})
        status = response.status_code
        answer = response.json() if status == 200 else {}
    except httpx.HTTPError as exc:  # a transport failure is a failure of the service too
        status, answer = 599, {"reason": type(exc).__name__}
    return {
        "t": started - t0,
        "status": status,
        "elapsed_ms": (time.monotonic() - started) * 1000,
        "budget_ms": budget_ms,
        "decision": answer.get("decision"),
        "degraded": answer.get("degraded"),
        "reason": answer.get("reason"),
    }


async def sustained_rate(client: httpx.AsyncClient, bodies: list[dict[str, Any]], n: int) -> float:
    """Requests per second answered one at a time (the first, cold one not counted)."""
    times = []
    for body in bodies[: n + 1]:
        started = time.monotonic()
        await client.post("/evaluate", json={**body, "latency_budget_ms": 120_000})
        times.append(time.monotonic() - started)
    return 1.0 / (sum(times[1:]) / max(len(times) - 1, 1))


async def soak(args: argparse.Namespace) -> dict[str, Any]:
    rng = random.Random(args.seed)
    bodies = requests_pool()
    rng.shuffle(bodies)
    for i, body in enumerate(bodies):
        body.pop("request_id", None)
        body["explain"] = i % 2 == 0
    env = {"GATEKEEPER_LOAD_TIERS": '["edge"]', "GATEKEEPER_LOG_LEVEL": "warning"}
    if args.model:
        env["GATEKEEPER_TIERS__EDGE__MODEL"] = args.model
    results: list[dict[str, Any]] = []
    samples: list[tuple[float, float]] = []
    parts: list[dict[str, float]] = []  # anon / file split of each sample
    with gatekeeper_server(env, ready_timeout=600) as (url, proc):
        async with httpx.AsyncClient(base_url=url, timeout=300) as client:
            rate = await sustained_rate(client, bodies, args.calibrate)
            target = args.rate_factor * rate
            print(
                f"sustained {rate:.3f} req/s one at a time; sending {target:.3f} req/s "
                f"(x{args.rate_factor}) for {args.minutes:g} min"
            )
            t0 = time.monotonic()
            end = t0 + args.minutes * 60
            tasks: set[asyncio.Task[dict[str, Any]]] = set()

            async def sample() -> None:
                while time.monotonic() < end:
                    memory = memory_mb(proc.pid)
                    samples.append((time.monotonic() - t0, memory["rss"]))
                    parts.append(memory)
                    await asyncio.sleep(args.sample_s)

            def finished(task: asyncio.Task[dict[str, Any]]) -> None:
                tasks.discard(task)
                results.append(task.result())

            sampler = asyncio.create_task(sample())
            i = 0
            while time.monotonic() < end:
                body = bodies[i % len(bodies)]
                i += 1
                task = asyncio.create_task(send(client, body, args.budget_ms, t0))
                tasks.add(task)
                task.add_done_callback(finished)
                await asyncio.sleep(rng.expovariate(target))
            await asyncio.gather(*tasks)
            await sampler
            memory = memory_mb(proc.pid)
            samples.append((time.monotonic() - t0, memory["rss"]))
            parts.append(memory)
            metrics = (await client.get("/metrics")).text
    return summarise(args, rate, results, samples, metrics, parts)


def summarise(
    args: argparse.Namespace,
    rate: float,
    results: list[dict[str, Any]],
    samples: list[tuple[float, float]],
    metrics: str,
    parts: list[dict[str, float]] | None = None,
) -> dict[str, Any]:
    ok = [r for r in results if r["status"] == 200]
    degraded = [r for r in ok if r["degraded"]]
    counts = {
        "requests": len(results),
        "answered": len(ok),
        "rejected": sum(1 for r in results if r["status"] == 429),
        "server_errors": sum(1 for r in results if r["status"] >= 500),
        "within_budget": sum(1 for r in ok if r["elapsed_ms"] <= r["budget_ms"] + 50),
        "fail_closed": len(degraded),
        "allow_degraded": sum(1 for r in degraded if r["decision"] == "allow"),
    }
    _print_answers(args, counts, ok, degraded)
    rss = _rss(args, samples, parts)
    shed = [
        line
        for line in metrics.splitlines()
        if line.startswith(("gatekeeper_rejected", "gatekeeper_shed"))
    ]
    if shed:
        print("server: " + "; ".join(shed))
    if args.out:
        plot(results, samples, rate * args.rate_factor, args.out, parts)
    summary = {**counts, **rss, "sustained_rps": rate}
    print(json.dumps(summary))
    return summary


def _print_answers(
    args: argparse.Namespace,
    counts: dict[str, int],
    ok: list[dict[str, Any]],
    degraded: list[dict[str, Any]],
) -> None:
    """What came back: answered, rejected, errors, within budget, fail-closed, latency."""
    n, within = counts["requests"], counts["within_budget"]
    print(
        f"\n{n} requests in {args.minutes:g} min: {len(ok)} answered, "
        f"{counts['rejected']} rejected (429)"
    )
    print(f"5xx (or transport failures): {counts['server_errors']} (target 0)")
    print(f"answered within budget + 50 ms: {within}/{len(ok)} = {within / max(len(ok), 1):.1%}")
    reasons = Counter(r["reason"] for r in degraded)
    print(
        f"fail-closed: {len(degraded)}/{len(ok)} = {len(degraded) / max(len(ok), 1):.1%} ("
        + ", ".join(f"{k} {v}" for k, v in reasons.most_common())
        + f"); allow among them: {counts['allow_degraded']} (target 0)"
    )
    lat = [r["elapsed_ms"] for r in ok]
    print(
        f"latency of answers p50 / p95 / p99: {pct(lat, 0.5):.0f} / {pct(lat, 0.95):.0f} / {pct(lat, 0.99):.0f} ms"
    )


def _rss(
    args: argparse.Namespace,
    samples: list[tuple[float, float]],
    parts: list[dict[str, float]] | None,
) -> dict[str, Any]:
    """The server's memory over time, printed: its growth after the warm-up and, where /proc
    gave it, the heap and mapped-file parts at the start and end of that span."""
    warm_at = args.warmup_min * 60
    warm = [m for t, m in samples if t >= warm_at] or [m for _, m in samples]
    growth = (warm[-1] - warm[0]) / warm[0] if warm else float("nan")
    peak_growth = (max(warm) - warm[0]) / warm[0] if warm else float("nan")
    print(
        "RSS over time (MB): "
        + ", ".join(f"{t / 60:.0f}m {m:.0f}" for t, m in samples[:: max(1, len(samples) // 12)])
    )
    print(
        f"RSS after {args.warmup_min:g} min warm-up: {warm[0]:.0f} -> {warm[-1]:.0f} MB at the end "
        f"({100 * growth:+.1f} %), peak {max(warm):.0f} MB ({100 * peak_growth:+.1f} %) (target < 5 %)"
    )
    split = {}
    if parts and len(parts) == len(samples):
        first = next((i for i, (t, _) in enumerate(samples) if t >= warm_at), 0)
        for key in ("anon", "file"):
            a, b = parts[first][key], parts[-1][key]
            split[key] = (a, b)
        print(
            "of which heap (RssAnon) "
            + " -> ".join(f"{v:.0f}" for v in split["anon"])
            + " MB, mapped files (RssFile, the model's weights) "
            + " -> ".join(f"{v:.0f}" for v in split["file"])
            + " MB over the same span"
        )
    return {"rss_growth": growth, "rss_peak_growth": peak_growth, "rss_split_mb": split}


def plot(
    results: list[dict[str, Any]],
    samples: list[tuple[float, float]],
    rps: float,
    out: Path,
    parts: list[dict[str, float]] | None = None,
) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

    fig, (top, bottom) = plt.subplots(2, 1, figsize=(8, 5.5), sharex=True)
    minutes = [t / 60 for t, _ in samples]
    top.plot(minutes, [m for _, m in samples], "-", color="tab:blue", label="RSS")
    if parts and len(parts) == len(samples):
        top.plot(minutes, [p["anon"] for p in parts], "--", color="tab:purple", label="heap")
        top.plot(minutes, [p["file"] for p in parts], ":", color="tab:gray", label="mapped files")
        top.legend(fontsize=7)
    top.set_ylabel("server memory (MB)")
    top.grid(alpha=0.3)
    top.set_title(f"Soak: edge model, Poisson arrivals at {rps:.2f} req/s", fontsize=10)
    for status, colour, label in ((200, "tab:green", "answered"), (429, "tab:orange", "rejected")):
        pts = [r for r in results if r["status"] == status]
        bottom.scatter(
            [r["t"] / 60 for r in pts],
            [r["elapsed_ms"] / 1000 for r in pts],
            s=6,
            c=colour,
            label=label,
        )
    bad = [r for r in results if r["status"] >= 500]
    if bad:
        bottom.scatter(
            [r["t"] / 60 for r in bad],
            [r["elapsed_ms"] / 1000 for r in bad],
            s=12,
            c="red",
            label="5xx",
        )
    bottom.set_xlabel("minutes")
    bottom.set_ylabel("latency (s)")
    bottom.grid(alpha=0.3)
    bottom.legend(fontsize=7)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out}")


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawDescriptionHelpFormatter
    )
    parser.add_argument("--minutes", type=float, default=30)
    parser.add_argument("--warmup-min", type=float, default=3, help="RSS growth counts from here")
    parser.add_argument("--rate-factor", type=float, default=2.0)
    parser.add_argument("--calibrate", type=int, default=4, help="requests to measure the rate")
    parser.add_argument("--budget-ms", type=int, default=30_000)
    parser.add_argument("--sample-s", type=float, default=5.0)
    parser.add_argument("--seed", type=int, default=0)
    parser.add_argument("--model", help="the edge tier's model (default: the configured one)")
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "soak.png")
    args = parser.parse_args()
    asyncio.run(soak(args))


if __name__ == "__main__":
    main()
