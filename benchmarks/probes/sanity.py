"""`benchmarks.probes sanity`: the hand-written actions of benchmarks/sanity_actions.py through
the service, probe path and generation path side by side.

For each action it prints the probe's P(unsafe) and the guard's two distances, read from the
same prefill the service runs, whether the probe abstains, and the decision the in-process
service gives with the probe on (its `decided_by`) and with it off. The decision-layer
features are saved, so other guards can be scored on them without the model."""

from __future__ import annotations

import argparse
import json
from typing import Any

import numpy as np

from benchmarks import quality
from benchmarks.action_sets import named_set, set_label
from benchmarks.probes.features import ROOT, probe_prompt, tier_model
from benchmarks.sanity_actions import SANITY, SANITY_FRESH
from service.backends.base import HiddenStateReader
from service.decision.ood import OodGuard
from service.decision.probe_path import probe_decision
from service.decision.probes import ProbeSet
from service.decision.prompt import BuiltPrompt
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.schemas import EvaluateRequest
from service.settings import load_settings


def _actions(args: argparse.Namespace) -> tuple[str, list[tuple[str, bool, dict[str, Any]]]]:
    """(file stem, actions) for --actions: `first`, `fresh` or a hand-written set
    (benchmarks/action_sets.py)."""
    if args.actions == "first":
        return "sanity", SANITY
    if args.actions == "fresh":
        return "sanity-fresh", SANITY_FRESH
    records = named_set(args.actions)
    return set_label(args.actions), [
        (str(r.raw.get("note") or r.id), r.unsafe, r.request.model_dump(exclude_none=True))
        for r in records
    ]


def _requests(args: argparse.Namespace) -> list[EvaluateRequest]:
    update = {"tier": args.tier, "explain": False, "latency_budget_ms": args.budget_ms}
    return [EvaluateRequest.model_validate(body | update) for _, _, body in _actions(args)[1]]


async def sanity(args: argparse.Namespace) -> None:
    stem, actions = _actions(args)
    requests = _requests(args)
    evidence = list(PolicyLibrary().get(DEFAULT_PACK).items)
    rows: list[dict[str, Any]] = []
    features: list[Any] = []
    probe = (
        args.probe
        or ROOT / "models" / "probes" / f"{tier_model(load_settings(), args.tier)[0]}.json"
    )
    async with quality.in_process(args.tier, "probe", probe=probe) as gatekeeper:
        tier = gatekeeper.pool.get(args.tier)
        probes, backend = tier.probes, tier.backend
        assert probes is not None and isinstance(backend, HiddenStateReader)
        for (label, unsafe, _), request in zip(actions, requests, strict=True):
            built = probe_prompt(request, backend, gatekeeper.settings, args.tier, evidence)
            x, read = _probe_read(probes, backend, built)
            features.append(x)
            served = await gatekeeper.evaluate(request)
            rows.append(
                {
                    "action": label,
                    "unsafe": unsafe,
                    **read,
                    "service": served.decision.value,
                    "decided_by": served.decided_by,
                    "degraded": served.degraded,
                    "total_ms": served.timing.total_ms,
                }
            )
    async with quality.in_process(args.tier, "generation") as gatekeeper:
        for row, request in zip(rows, requests, strict=True):
            generated = await gatekeeper.evaluate(request)
            row["generation"] = generated.decision.value
            row["generation_ms"] = generated.timing.total_ms
    _print(rows, probes.guard)
    out = args.out or ROOT / "bench-results" / "probes"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"{stem}-{args.tier}.json").write_text(json.dumps(rows, indent=1))
    np.savez(out / f"{stem}-{args.tier}-features.npz", last=np.stack(features))
    print(f"\nwrote {out}/{stem}-{args.tier}.json and the layer's features")


def _probe_read(
    probes: ProbeSet, backend: HiddenStateReader, built: BuiltPrompt
) -> tuple[Any, dict[str, Any]]:
    """The guard layer's features and the probe's own columns of the table for one action."""
    # the features the service reads, from the same prompt (a second prefill: most of
    # it comes from the KV cache)
    states = backend.hidden_states(
        built.prompt,
        layers=probes.layers,
        marks=built.marks,
        span=probes.decision_span(bool(built.marks)),
    )
    at = {layer: k for k, layer in enumerate(states.layers)}
    read = probes.decision_rows(states)
    x = read[at[probes.guard.layer]]
    x_decision = read[at[probes.decision.layer]]
    p = float(probes.decision.prob(x_decision))
    reading = probes.guard.read(x, float(probes.decision.score(x_decision)))
    return x, {
        "p_unsafe": p,
        "probe": probe_decision(probes, p).value,
        "distance": reading.distance,
        "residual": reading.residual,
        "score": reading.score,
        "inside": reading.inside,
    }


def _print(rows: list[dict[str, Any]], guard: OodGuard) -> None:
    print(
        f"guard: in distribution when distance <= {guard.max_distance:.2f}, residual <= "
        f"{guard.max_residual:.2f} and score within {guard.min_score:.2f} to "
        f"{guard.max_score:.2f}\n"
    )
    print(
        f"{'hand-written action':<46}{'unsafe':>7}{'P(uns)':>8}{'dist':>7}{'resid':>7}"
        f"{'score':>7}{'abstain':>8}{'probe on':>10}{'by':>12}{'probe off':>10}"
    )
    for r in rows:
        abstained = r["decided_by"] == "generation"
        print(
            f"{r['action'][:45]:<46}{'yes' if r['unsafe'] else 'no':>7}{r['p_unsafe']:>8.3f}"
            f"{r['distance']:>7.1f}{r['residual']:>7.1f}{r['score']:>7.1f}"
            f"{'yes' if abstained else 'no':>8}"
            f"{r['service']:>10}{r['decided_by']:>12}{r['generation']:>10}"
        )
    for key, name in (("service", "probe on (guarded)"), ("generation", "probe off")):
        allowed_unsafe = sum(r["unsafe"] and r[key] == "allow" for r in rows)
        right = sum((r[key] != "allow") == r["unsafe"] for r in rows)
        print(
            f"{name}: {allowed_unsafe} unsafe allowed of {sum(r['unsafe'] for r in rows)}; "
            f"verdicts right {right} of {len(rows)}"
        )
    for key, name in (("total_ms", "probe on (guarded)"), ("generation_ms", "probe off")):
        print(f"{name}: p50 {np.median([r[key] for r in rows]) / 1000:.1f} s per action")
    outside = sum(not r["inside"] for r in rows)
    print(f"guard: {outside} of {len(rows)} hand-written actions out of distribution")
