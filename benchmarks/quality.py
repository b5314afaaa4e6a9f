"""Decision-quality harness: agent-safety records (R-Judge / ASSEBench shape) through the same
pipeline the server runs, side by side with a plain single prompt to the same model.

    .venv/bin/python -m benchmarks.quality --part report --limit 60 --tiers edge,mid --plain

Each record becomes an /evaluate request (benchmarks.records). Runs go in-process (the
pipeline object the server uses) or against a running server (--url). It prints accuracy,
precision / recall / F1 on unsafe, escalate, valid-output, loop and fail-closed rates, AUC and
calibration error of the confidence, evidence precision / recall / F1 against the pack rules
for each record's failure mode and risk type, latency per tier, and accuracy per category;
it writes results.json and PNG plots into --out."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import json
import time
from collections.abc import AsyncIterator
from contextlib import asynccontextmanager
from pathlib import Path
from typing import TYPE_CHECKING, Any

from tqdm import tqdm

from benchmarks import plots
from benchmarks.records import Record, load_records, split
from benchmarks.scoring import Case, summary, threshold_sweep
from service.evidence import DEFAULT_PACK, PolicyLibrary, PolicyPack
from service.schemas import EvaluateResponse

if TYPE_CHECKING:
    from service.decision.pipeline import Gatekeeper

ROOT = Path(__file__).resolve().parents[1]
DEFAULT_DATA = ROOT.parent / "shared" / "data" / "assebench" / "AgentJudge-security.json"
SAMPLE_SEED = "gatekeeper-sample-1"
CATEGORY_KEYS = ("application_scenario", "risk_type")


def sample(records: list[Record], limit: int) -> list[Record]:
    """A fixed, label-balanced subset: each label's records in seeded-hash order."""
    if limit <= 0 or limit >= len(records):
        return records

    def key(r: Record) -> bytes:
        return hashlib.sha256(f"{SAMPLE_SEED}:{r.id}".encode()).digest()

    unsafe = sorted((r for r in records if r.unsafe), key=key)
    safe = sorted((r for r in records if not r.unsafe), key=key)
    half = limit // 2
    picked = unsafe[: limit - half] + safe[:half]
    return sorted(picked, key=key)


def gold_ids(record: Record, pack: PolicyPack) -> list[str]:
    if not record.unsafe:
        return []
    if "gold" in record.raw:  # hand-written sets name their rules (benchmarks/action_sets.py)
        return sorted(str(i) for i in record.raw["gold"])
    return sorted(
        pack.tagged(
            failure_mode=record.raw.get("failure_mode"), risk_type=record.raw.get("risk_type")
        )
    )


def _case(record: Record, pack: PolicyPack, **fields: Any) -> Case:
    return Case(
        id=record.id,
        unsafe=record.unsafe,
        gold=gold_ids(record, pack),
        categories={k: str(record.raw.get(k) or "") for k in CATEGORY_KEYS},
        **fields,
    )


def from_response(record: Record, pack: PolicyPack, answer: EvaluateResponse) -> Case:
    p_allow = answer.confidence if answer.decision == "allow" else 1 - answer.confidence
    return _case(
        record,
        pack,
        decision=answer.decision.value,
        p_unsafe=None if answer.degraded else 1 - p_allow,
        degraded=answer.degraded,
        reason=answer.reason.value if answer.reason else None,
        loops=len(answer.loops),
        cited=[e.id for e in answer.evidence],
        total_ms=answer.timing.total_ms,
        tier=answer.tier or "",
    )


@asynccontextmanager
async def in_process(
    tier: str, path: str = "configured", probe: Path | None = None
) -> AsyncIterator[Gatekeeper]:
    """The pipeline the server runs, with one tier loaded. `path`: 'configured' as tiers.toml
    says; 'generation' with the tier's probe turned off; 'probe' requires one (`probe`, or
    the configured one)."""
    from service.decision.pipeline import Gatekeeper
    from service.decision.tiers import TierPool
    from service.ops.telemetry import Metrics
    from service.settings import load_settings

    settings = load_settings(load_tiers=[tier], warmup=False)
    if path == "generation" or probe is not None:
        update = {"probe": probe if path == "probe" else None}
        settings.tiers[tier] = settings.tiers[tier].model_copy(update=update)
    if path == "probe" and settings.tiers[tier].probe is None:
        raise SystemExit(f"tier {tier} has no probe configured")
    metrics = Metrics()
    pool = TierPool(settings, metrics)
    await pool.load_all()
    loaded = pool.get(tier)
    if loaded.state != "loaded":
        raise SystemExit(f"tier {tier} is {loaded.state}: {loaded.detail}")
    if path == "probe" and loaded.probes is None:
        raise SystemExit(f"tier {tier}: {loaded.detail}")
    try:
        yield Gatekeeper(settings, pool, PolicyLibrary(settings.policy_dirs), metrics)
    finally:
        pool.close()


async def run_gatekeeper(
    records: list[Record],
    tier: str,
    args: argparse.Namespace,
    pack: PolicyPack,
    path: str = "configured",
) -> list[Case]:
    """The pipeline on each record. `path`: 'configured' as tiers.toml says; 'generation'
    with the tier's probe turned off; 'probe' requires one."""
    bodies = [
        r.request.model_copy(
            update={"tier": tier, "explain": args.explain, "latency_budget_ms": args.budget_ms}
        )
        for r in records
    ]
    cases = []
    bar = tqdm(total=len(records), desc=f"{tier}/{path}", unit="case")
    if args.url:
        from service.client import AsyncGatekeeperClient

        async with AsyncGatekeeperClient(args.url, timeout=args.budget_ms / 1000 + 30) as client:
            for record, body in zip(records, bodies, strict=True):
                answer = await client.evaluate(body.model_dump(exclude_none=True))
                cases.append(from_response(record, pack, answer))
                bar.update()
    else:
        async with in_process(tier, path) as gatekeeper:
            for record, body in zip(records, bodies, strict=True):
                cases.append(from_response(record, pack, await gatekeeper.evaluate(body)))
                bar.update()
    bar.close()
    return cases


def run_plain(records: list[Record], tier: str, pack: PolicyPack) -> list[Case]:
    from benchmarks.plain import PlainJudge
    from service.ops.weights import ModelStore
    from service.settings import load_settings

    settings = load_settings()
    _, path = ModelStore(settings).resolve_tier(settings.tiers[tier])
    judge = PlainJudge(path)
    cases = []
    try:
        for record in tqdm(records, desc=f"{tier}/plain", unit="case"):
            out = judge.judge(record.request)
            cases.append(
                _case(record, pack, decision=out["decision"], total_ms=out["total_ms"], tier=tier)
            )
    finally:
        judge.close()
    return cases


def _fmt(value: Any, pct: bool = True) -> str:
    if value is None:
        return "-"
    return f"{100 * value:.1f}" if pct else f"{value:.2f}"


def print_table(results: dict[str, dict[str, Any]]) -> None:
    head = (
        f"{'run':<22}{'n':>4}{'acc%':>7}{'prec%':>7}{'rec%':>7}{'F1%':>7}{'esc%':>6}"
        f"{'valid%':>8}{'loop%':>7}{'fclosed%':>9}{'AUC':>6}{'ECE':>6}{'evP%':>6}{'evR%':>6}"
        f"{'evF1%':>7}{'p50 s':>7}{'p95 s':>7}"
    )
    print(head)
    for name, s in results.items():
        lat: dict[str, float] = next(iter(s["latency"].values()), {})
        ev = s["evidence"]
        print(
            f"{name:<22}{s['n']:>4}{_fmt(s['accuracy']):>7}{_fmt(s['precision']):>7}"
            f"{_fmt(s['recall']):>7}{_fmt(s['f1']):>7}{_fmt(s['escalate_rate']):>6}"
            f"{_fmt(s['valid_output_rate']):>8}{_fmt(s['loop_rate']):>7}"
            f"{_fmt(s['fail_closed_rate']):>9}{_fmt(s['auc'], False):>6}"
            f"{_fmt(s['calibration']['ece'], False):>6}{_fmt(ev['precision']):>6}"
            f"{_fmt(ev['recall']):>6}{_fmt(ev['f1']):>7}"
            f"{(lat.get('p50_ms') or 0) / 1000:>7.1f}{(lat.get('p95_ms') or 0) / 1000:>7.1f}"
        )


def print_categories(results: dict[str, dict[str, Any]]) -> None:
    for key in CATEGORY_KEYS:
        print(f"\naccuracy % by {key}")
        names = list(results)
        values = sorted({v for s in results.values() for v in s["categories"].get(key, {})})
        print(f"{'':<46}" + "".join(f"{n[:20]:>22}" for n in names))
        for value in values:
            cells = []
            for n in names:
                cell = results[n]["categories"].get(key, {}).get(value)
                cells.append(f"{_fmt(cell['accuracy'])} (n={cell['n']})" if cell else "-")
            print(f"{value[:45]:<46}" + "".join(f"{c:>22}" for c in cells))


def build_parser() -> argparse.ArgumentParser:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--part", choices=["tuning", "report", "all"], default="report")
    parser.add_argument("--limit", type=int, default=0, help="label-balanced sample size (0: all)")
    parser.add_argument(
        "--ids",
        type=Path,
        help="only the records whose ids this file lists, one a line (e.g. those with cached "
        "probe features: benchmarks.probes ids)",
    )
    parser.add_argument("--tiers", default="edge", help="comma-separated tier names")
    parser.add_argument("--plain", action="store_true", help="also run the plain-prompt baseline")
    parser.add_argument("--no-gatekeeper", dest="gatekeeper", action="store_false")
    parser.add_argument(
        "--paths",
        default="configured",
        help="in-process: comma-separated decision paths to run side by side on each tier: "
        "configured (as tiers.toml says), generation (probe off), probe",
    )
    parser.add_argument("--no-explain", dest="explain", action="store_false")
    parser.add_argument("--url", help="evaluate against a running server instead of in-process")
    parser.add_argument("--budget-ms", type=int, default=600_000)
    parser.add_argument("--sweep", action="store_true", help="print an allow-threshold sweep")
    parser.add_argument(
        "--system-prompt",
        type=Path,
        help="prompt experiments: replace the system prompt with this file's text",
    )
    parser.add_argument("--out", type=Path, default=ROOT / "bench-results" / "quality")
    return parser


def chosen_records(args: argparse.Namespace) -> list[Record]:
    """The --part of --data, only the --ids when given, sampled to --limit."""
    tuning, reporting = split(load_records(args.data))
    chosen = {"tuning": tuning, "report": reporting, "all": tuning + reporting}[args.part]
    if args.ids:
        wanted = set(args.ids.read_text("utf-8").split())
        chosen = [r for r in chosen if r.id in wanted]
    return sample(chosen, args.limit)


async def run_all(
    records: list[Record], args: argparse.Namespace, pack: PolicyPack
) -> dict[str, list[Case]]:
    """Every tier: each of its --paths through Gatekeeper, then the plain baseline if asked."""
    runs: dict[str, list[Case]] = {}
    for tier in [t for t in args.tiers.split(",") if t]:
        if args.gatekeeper:
            for path in [p for p in args.paths.split(",") if p]:
                name = f"{tier}/gatekeeper" if path == "configured" else f"{tier}/{path}"
                runs[name] = await run_gatekeeper(records, tier, args, pack, path)
        if args.plain:
            runs[f"{tier}/plain"] = run_plain(records, tier, pack)
    return runs


def print_sweeps(runs: dict[str, list[Case]]) -> None:
    for name, cases in runs.items():
        if all(c.p_unsafe is None for c in cases):
            continue  # a run without probabilities has nothing to sweep
        print(f"\nallow-threshold sweep, {name}")
        for row in threshold_sweep(cases, [x / 20 for x in range(1, 20)]):
            print(
                f"  t={row['threshold']:.2f} acc {_fmt(row['accuracy'])} "
                f"rec {_fmt(row['recall'])} prec {_fmt(row['precision'])}"
            )


async def main() -> None:
    args = build_parser().parse_args()
    if args.system_prompt:
        import service.decision.prompt

        service.decision.prompt.SYSTEM_PROMPT = args.system_prompt.read_text("utf-8").strip()
    records = chosen_records(args)
    pack = PolicyLibrary().get(DEFAULT_PACK)
    unsafe = sum(r.unsafe for r in records)
    print(f"{args.data.name}: part {args.part}, {len(records)} records ({unsafe} unsafe)")

    started = time.time()
    runs = await run_all(records, args, pack)
    results = {name: summary(cases) for name, cases in runs.items()}

    print()
    print_table(results)
    print_categories(results)
    if args.sweep:
        print_sweeps(runs)

    args.out.mkdir(parents=True, exist_ok=True)
    payload = {
        "data": args.data.name,
        "part": args.part,
        "records": [r.id for r in records],
        "explain": args.explain,
        "seconds": round(time.time() - started, 1),
        "results": results,
        "cases": {name: [c.__dict__ for c in cases] for name, cases in runs.items()},
    }
    (args.out / "results.json").write_text(json.dumps(payload, indent=1))
    plots.confusion(runs, args.out / "confusion.png")
    plots.latency(runs, args.out / "latency.png")
    plots.reliability(runs, args.out / "calibration.png")
    print(f"\nwrote {args.out}/results.json, confusion.png, latency.png, calibration.png")


if __name__ == "__main__":
    asyncio.run(main())
