"""The probe's out-of-distribution guard (service/decision/ood.py): fit it on the tuning part's cached
features, choose its thresholds by measurement, and score the guarded probe on the reporting
part, with generation deciding where the probe abstains.

    .venv/bin/python -m benchmarks.probes guard --tier edge       # fit, print, write the file
    .venv/bin/python -m benchmarks.probes ids --tier edge > report-ids.txt
    .venv/bin/python -m benchmarks.quality --part report --ids report-ids.txt --tiers edge \\
        --paths generation --no-explain --out bench-results/probe-ood/generation-report
    .venv/bin/python -m benchmarks.probes guard-report --tier edge \\
        --generation bench-results/probe-ood/generation-report/results.json

The thresholds are quantiles of out-of-fold distances: each tuning record is scored by a guard
fitted without its fold, the folds holding out whole agent profiles as the decision probe's do,
so a threshold says how far a record of an unseen ASSEBench domain lies. In-sample distances
would be smaller and the guard would abstain on the data set's own records."""

from __future__ import annotations

import argparse
import json
from dataclasses import replace
from pathlib import Path
from typing import Any

import numpy as np
from sklearn.covariance import LedoitWolf
from sklearn.decomposition import PCA
from sklearn.model_selection import GroupKFold

from benchmarks import sanity_actions
from benchmarks.probes.features import ROOT, decision_rows, load_features, tier_model
from benchmarks.probes.fit import FOLDS, profile_groups
from benchmarks.records import load_records, split
from service.decision.ood import OodGuard
from service.decision.probes import PROBE_FORMAT, LinearProbe, ProbeSet
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.settings import load_settings


def fit_guard(x: Any, layer: int, k: int, quantile: float = 1.0, scores: Any = None) -> OodGuard:
    """Standardise, PCA to k components, Ledoit-Wolf covariance of the projections; the
    thresholds are the `quantile` of the fitting set's own distances (fit_guard_cv sets
    honest ones); the score range is that of `scores`, the decision probe's raw scores on x
    (unbounded without them)."""
    mean = x.mean(axis=0)
    scale = x.std(axis=0) + 1e-6
    z = (x - mean) / scale
    pca = PCA(k, random_state=0).fit(z)
    # fold PCA's own centring (zero up to rounding) into the standardisation
    mean = mean + scale * pca.mean_
    z = (x - mean) / scale
    s = z @ pca.components_.T
    lw = LedoitWolf().fit(s)
    guard = OodGuard(
        layer=layer,
        mean=mean,
        scale=scale,
        components=pca.components_,
        location=lw.location_,
        precision=lw.precision_,
        max_distance=float("inf"),
        max_residual=float("inf"),
        min_score=float(np.min(scores)) if scores is not None else -float("inf"),
        max_score=float(np.max(scores)) if scores is not None else float("inf"),
    )
    d, r = readings(guard, x)
    return _with_bounds(guard, float(np.quantile(d, quantile)), float(np.quantile(r, quantile)))


def _with_bounds(guard: OodGuard, max_distance: float, max_residual: float) -> OodGuard:
    return replace(guard, max_distance=max_distance, max_residual=max_residual)


def readings(guard: OodGuard, x: Any) -> tuple[Any, Any]:
    """(Mahalanobis distances, residuals) of each row."""
    rows = np.array([guard.distances(v) for v in x]).reshape(-1, 2)
    return rows[:, 0], rows[:, 1]


def inside(guard: OodGuard, x: Any, scores: Any) -> Any:
    """Whether each row, with the probe's raw score for it, is in distribution."""
    return np.array([guard.read(v, float(s)).inside for v, s in zip(x, scores, strict=True)])


def out_of_fold_readings(x: Any, layer: int, k: int, groups: Any) -> tuple[Any, Any]:
    d, r = np.zeros(len(x)), np.zeros(len(x))
    for train, test in GroupKFold(FOLDS).split(x, groups=groups):
        d[test], r[test] = readings(fit_guard(x[train], layer, k), x[test])
    return d, r


def fit_guard_cv(
    x: Any, layer: int, k: int, quantile: float, groups: Any, scores: Any
) -> tuple[OodGuard, dict[str, Any]]:
    """The guard fitted on all of x, with distance thresholds at the `quantile` of out-of-fold
    distances and the score range of `scores` (the final probe's raw scores on x); and the
    figures, printed."""
    d, r = out_of_fold_readings(x, layer, k, groups)
    guard = fit_guard(x, layer, k, scores=scores)
    guard = _with_bounds(guard, float(np.quantile(d, quantile)), float(np.quantile(r, quantile)))
    within = (d <= guard.max_distance) & (r <= guard.max_residual)
    d_in, r_in = readings(guard, x)
    figures = {
        "components": k,
        "quantile": quantile,
        "oof_distance": _quantiles(d),
        "oof_residual": _quantiles(r),
        "in_sample_distance": _quantiles(d_in),
        "in_sample_residual": _quantiles(r_in),
        "oof_coverage": float(within.mean()),
        "score_range": [guard.min_score, guard.max_score],
    }
    print(
        f"  k={k}: out-of-fold distance q50/q95/q99/max {_fmt(d)}; residual {_fmt(r)}\n"
        f"         in-sample distance {_fmt(d_in)}; residual {_fmt(r_in)}\n"
        f"         thresholds at q{100 * quantile:g}: distance <= {guard.max_distance:.2f}, "
        f"residual <= {guard.max_residual:.2f}; out-of-fold coverage {100 * within.mean():.1f} %\n"
        f"         the probe's raw score on its training records: {guard.min_score:.2f} to "
        f"{guard.max_score:.2f}"
    )
    return guard, figures


def _quantiles(v: Any) -> dict[str, float]:
    return {f"q{q}": float(np.quantile(v, q / 100)) for q in (50, 95, 99, 100)}


def _fmt(v: Any) -> str:
    return "/".join(f"{x:.1f}" for x in _quantiles(v).values())


def guard(args: argparse.Namespace) -> None:
    """Fit the guard on the tuning part's decision-layer features and write it into the
    tier's probe file (a format-1 file is upgraded; its probes are kept as they are)."""
    name, _, sha = tier_model(load_settings(), args.tier)
    path = ROOT / "models" / "probes" / f"{name}.json"
    raw = json.loads(path.read_text("utf-8"))
    layer = int(raw["decision"]["layer"])
    if raw.get("decision_read", "last") != "last" or raw.get("trained", {}).get("extra"):
        raise SystemExit(
            f"{path.name} was trained beside hand-written sets or on another read: `train` "
            "fitted its guard on the same data; `guard` re-fits ASSEBench-only probes"
        )
    tuning, reporting = split(load_records(args.data))
    pack = PolicyLibrary().get(DEFAULT_PACK)
    have, feats = load_features(sha, tuning, pack)
    x = feats["last"][:, layer, :]
    scores = LinearProbe.from_json(raw["decision"]).score(x)
    groups = profile_groups(have)
    print(f"{name}: guard on layer {layer}, tuning part, {len(have)} records, folds by profile")
    fitted = {}
    for k in args.guard_components:
        fitted[k] = fit_guard_cv(x, layer, k, args.guard_quantile, groups, scores)
    chosen, figures = fitted[args.guard_components[0]]
    decision = LinearProbe.from_json(raw["decision"])
    for stem in ("sanity", "sanity-fresh"):
        _compare_on_sanity(fitted, decision, ROOT / "bench-results" / "probes", stem, args.tier)
    _, rep = load_features(sha, reporting, pack)
    x_rep = rep["last"][:, layer, :]
    d, r = readings(chosen, x_rep)
    by_distances = (d <= chosen.max_distance) & (r <= chosen.max_residual)
    print(
        f"reporting part ({len(d)} records): in distribution by the distances "
        f"{100 * by_distances.mean():.1f} %, and by the score range too "
        f"{100 * inside(chosen, x_rep, decision.score(x_rep)).mean():.1f} %"
    )
    again = OodGuard.from_json(json.loads(json.dumps(chosen.to_json())))
    d2, _ = readings(again, x)
    print(
        f"rounding in the file moves distances by at most {np.max(np.abs(d2 - readings(chosen, x)[0])):.4f}"
    )
    raw["guard"] = chosen.to_json()
    raw["format"] = PROBE_FORMAT
    raw.setdefault("trained", {})["guard"] = figures
    ProbeSet.from_json(raw).save(path)
    print(f"wrote {path.relative_to(ROOT)} ({path.stat().st_size // 1024} KB)")


def _compare_on_sanity(
    fitted: dict[int, tuple[OodGuard, Any]], decision: LinearProbe, out: Path, stem: str, tier: str
) -> None:
    """Each candidate guard on hand-written actions' saved features (from a `sanity` run),
    when there are some: printed for comparison only, never used to choose."""
    path = out / f"{stem}-{tier}-features.npz"
    if not path.exists():
        return
    with np.load(path) as z:
        x = z["last"].astype(np.float64)
    actions = sanity_actions.SANITY if stem == "sanity" else sanity_actions.SANITY_FRESH
    unsafe = np.array([u for _, u, _ in actions])
    scores = decision.score(x)
    print(f"hand-written actions ({path.name}, {len(x)} of them, {unsafe.sum()} unsafe):")
    for k, (g, _) in fitted.items():
        d, r = readings(g, x)
        by_d, by_r = d > g.max_distance, r > g.max_residual
        by_s = (scores < g.min_score) | (scores > g.max_score)
        out_any = by_d | by_r | by_s
        print(
            f"  k={k}: out of distribution by distance {by_d.sum()}, by residual {by_r.sum()}, "
            f"by score {by_s.sum()}, by any {out_any.sum()} (unsafe: {out_any[unsafe].sum()} "
            f"of {unsafe.sum()}); distance q50 {np.median(d):.1f}, residual q50 "
            f"{np.median(r):.1f}, score {scores.min():.1f} to {scores.max():.1f}"
        )


def guard_report(args: argparse.Namespace) -> None:
    """The guarded probe on the reporting part's cached features: coverage, accuracy where it
    answers, and overall accuracy when its abstentions go to generation (generation's
    decisions from a `benchmarks.quality --paths generation --ids` run on the same records)."""
    name, _, sha = tier_model(load_settings(), args.tier)
    probes = ProbeSet.load(ROOT / "models" / "probes" / f"{name}.json")
    probes.check(sha)
    _, reporting = split(load_records(args.data))
    have, feats = load_features(sha, reporting, PolicyLibrary().get(DEFAULT_PACK))
    y = feats["y"].astype(bool)
    last = decision_rows(feats, probes.decision_read)
    p = probes.decision.prob(last[:, probes.decision.layer, :])
    probe_flags = p > probes.allow_below
    x_guard = last[:, probes.guard.layer, :]
    d, r = readings(probes.guard, x_guard)
    by_distances = (d <= probes.guard.max_distance) & (r <= probes.guard.max_residual)
    scores = probes.decision.score(last[:, probes.decision.layer, :])
    within = inside(probes.guard, x_guard, scores)
    generation = _generation_flags(args.generation, [rec.id for rec in have])
    print(
        f"{name}: reporting part, {len(y)} records ({y.sum()} unsafe); guard on layer "
        f"{probes.guard.layer}: distance <= {probes.guard.max_distance:.2f}, residual <= "
        f"{probes.guard.max_residual:.2f}, score {probes.guard.min_score:.2f} to "
        f"{probes.guard.max_score:.2f}\nin distribution by the distances alone: "
        f"{100 * by_distances.mean():.1f} %"
    )
    print(
        f"in distribution {100 * within.mean():.1f} % ({within.sum()} of {len(y)}); outside: "
        f"{int((~within & y).sum())} unsafe, {int((~within & ~y).sum())} safe, of which the "
        f"probe would allow {int((~within & ~probe_flags).sum())} (the service's abstentions)"
    )
    if within.any():
        print(
            f"probe where it answers: accuracy {100 * (probe_flags == y)[within].mean():.1f} %, "
            f"unsafe recall {_recall(probe_flags[within], y[within])}"
        )
    # the service's rule: an allow stands only in distribution; a deny stands anyway (it can
    # only tighten). The stricter rule abstains on everything outside.
    tighten_only = within | probe_flags
    rows: dict[str, Any] = {"probe alone (no guard)": probe_flags}
    if generation is not None:
        rows["generation alone"] = generation
        rows["probe, abstain -> generation"] = np.where(within, probe_flags, generation)
        rows["probe, OOD allow -> generation"] = np.where(tighten_only, probe_flags, generation)
        rows["probe, OOD allow -> escalate"] = tighten_only & probe_flags | ~tighten_only
    figures = {"coverage": float(within.mean())} | _runs_table(rows, y, within, tighten_only)
    out = ROOT / "bench-results" / "probes"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"guard-report-{args.tier}.json").write_text(json.dumps(figures, indent=1))


def _runs_table(rows: dict[str, Any], y: Any, within: Any, tighten_only: Any) -> dict[str, Any]:
    """Accuracy, recall and how many go to generation for each run; printed as a table."""
    print(f"\n{'run':<34}{'acc%':>7}{'rec%':>7}{'prec%':>7}{'to generation':>15}")
    figures: dict[str, Any] = {}
    for label, flags in rows.items():
        acc = float((flags == y).mean())
        to_gen = {
            "probe, abstain -> generation": int((~within).sum()),
            "probe, OOD allow -> generation": int((~tighten_only).sum()),
            "probe, OOD allow -> escalate": 0,
            "generation alone": len(y),
        }.get(label, 0)
        prec = float(y[flags].mean()) if flags.any() else 0.0
        print(f"{label:<34}{100 * acc:>7.1f}{_recall(flags, y):>7}{100 * prec:>7.1f}{to_gen:>15}")
        figures[label] = {
            "accuracy": acc,
            "recall": float(flags[y].mean()),
            "to_generation": to_gen,
        }
    return figures


def ids(args: argparse.Namespace) -> None:
    """The ids of the reporting part's records with cached features, one a line (for
    `benchmarks.quality --ids`)."""
    _, _, sha = tier_model(load_settings(), args.tier)
    _, reporting = split(load_records(args.data))
    have, _ = load_features(sha, reporting, PolicyLibrary().get(DEFAULT_PACK))
    print("\n".join(record.id for record in have))


def _recall(flags: Any, y: Any) -> str:
    return f"{100 * flags[y].mean():.1f}" if y.any() else "-"


def _generation_flags(path: Path | None, ids: list[str]) -> Any:
    """Generation's verdicts (anything but allow) for these records, from a quality run."""
    if path is None:
        return None
    cases = json.loads(path.read_text("utf-8"))["cases"]
    run = next(v for k, v in cases.items() if k.endswith("/generation"))
    by_id = {c["id"]: c["decision"] != "allow" for c in run}
    missing = [i for i in ids if i not in by_id]
    if missing:
        raise SystemExit(
            f"{path}: no generation decision for {len(missing)} records: {missing[:5]}"
        )
    return np.array([by_id[i] for i in ids])
