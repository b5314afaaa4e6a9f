"""The probe's out-of-distribution guard (service/ood.py): fit it on the tuning part's cached
features, choose its thresholds by measurement, and score the guarded probe on the reporting
part, with generation deciding where the probe abstains.

    .venv/bin/python -m benchmarks.probes guard --tier edge       # fit, print, write the file
    .venv/bin/python -m benchmarks.probes guard-report --tier edge \\
        --generation bench-results/probe-ood/generation-report/results.json

The thresholds are quantiles of out-of-fold distances: each tuning record is scored by a guard
fitted without its fold, the folds holding out whole agent profiles as the decision probe's do,
so a threshold says how far a record of an unseen ASSEBench domain lies. In-sample distances
would be smaller and the guard would abstain on the data set's own records."""

from __future__ import annotations

import argparse
import json
from pathlib import Path
from typing import Any

import numpy as np

from service.ood import OodGuard
from service.probes import ProbeSet


def fit_guard(x: Any, layer: int, k: int, quantile: float = 1.0) -> OodGuard:
    """Standardise, PCA to k components, Ledoit-Wolf covariance of the projections; the
    thresholds are the `quantile` of the fitting set's own distances (fit_guard_cv sets
    honest ones)."""
    from sklearn.covariance import LedoitWolf
    from sklearn.decomposition import PCA

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
    )
    d, r = readings(guard, x)
    return _with_bounds(guard, float(np.quantile(d, quantile)), float(np.quantile(r, quantile)))


def _with_bounds(guard: OodGuard, max_distance: float, max_residual: float) -> OodGuard:
    from dataclasses import replace

    return replace(guard, max_distance=max_distance, max_residual=max_residual)


def readings(guard: OodGuard, x: Any) -> tuple[Any, Any]:
    """(Mahalanobis distances, residuals) of each row."""
    rows = [guard.read(v) for v in x]
    return np.array([r.distance for r in rows]), np.array([r.residual for r in rows])


def out_of_fold_readings(x: Any, layer: int, k: int, groups: Any) -> tuple[Any, Any]:
    from sklearn.model_selection import GroupKFold

    from benchmarks.probes import FOLDS

    d, r = np.zeros(len(x)), np.zeros(len(x))
    for train, test in GroupKFold(FOLDS).split(x, groups=groups):
        d[test], r[test] = readings(fit_guard(x[train], layer, k), x[test])
    return d, r


def fit_guard_cv(
    x: Any, layer: int, k: int, quantile: float, groups: Any
) -> tuple[OodGuard, dict[str, Any]]:
    """The guard fitted on all of x, with thresholds at the `quantile` of out-of-fold
    distances; and the figures, printed."""
    d, r = out_of_fold_readings(x, layer, k, groups)
    guard = fit_guard(x, layer, k)
    guard = _with_bounds(guard, float(np.quantile(d, quantile)), float(np.quantile(r, quantile)))
    inside = (d <= guard.max_distance) & (r <= guard.max_residual)
    d_in, r_in = readings(guard, x)
    figures = {
        "components": k,
        "quantile": quantile,
        "oof_distance": _quantiles(d),
        "oof_residual": _quantiles(r),
        "in_sample_distance": _quantiles(d_in),
        "in_sample_residual": _quantiles(r_in),
        "oof_coverage": float(inside.mean()),
    }
    print(
        f"  k={k}: out-of-fold distance q50/q95/q99/max {_fmt(d)}; residual {_fmt(r)}\n"
        f"         in-sample distance {_fmt(d_in)}; residual {_fmt(r_in)}\n"
        f"         thresholds at q{100 * quantile:g}: distance <= {guard.max_distance:.2f}, "
        f"residual <= {guard.max_residual:.2f}; out-of-fold coverage {100 * inside.mean():.1f} %"
    )
    return guard, figures


def _quantiles(v: Any) -> dict[str, float]:
    return {f"q{q}": float(np.quantile(v, q / 100)) for q in (50, 95, 99, 100)}


def _fmt(v: Any) -> str:
    return "/".join(f"{x:.1f}" for x in _quantiles(v).values())


def guard(args: argparse.Namespace) -> None:
    """Fit the guard on the tuning part's decision-layer features and write it into the
    tier's probe file (a format-1 file is upgraded; its probes are kept as they are)."""
    from benchmarks.probes import ROOT, load_features, profile_groups, tier_model
    from service.evidence import DEFAULT_PACK, PolicyLibrary
    from service.probes import PROBE_FORMAT
    from service.records import load_records, split
    from service.settings import load_settings

    name, _, sha = tier_model(load_settings(), args.tier)
    path = ROOT / "models" / "probes" / f"{name}.json"
    raw = json.loads(path.read_text("utf-8"))
    layer = int(raw["decision"]["layer"])
    tuning, reporting = split(load_records(args.data))
    pack = PolicyLibrary().get(DEFAULT_PACK)
    have, feats = load_features(sha, tuning, pack)
    x = feats["last"][:, layer, :]
    groups = profile_groups(have)
    print(f"{name}: guard on layer {layer}, tuning part, {len(have)} records, folds by profile")
    fitted = {}
    for k in args.guard_components:
        fitted[k] = fit_guard_cv(x, layer, k, args.guard_quantile, groups)
    chosen, figures = fitted[args.guard_components[0]]
    _compare_on_sanity(fitted, ROOT / "bench-results" / "probes" / f"sanity-{args.tier}")
    _, rep = load_features(sha, reporting, pack)
    d, r = readings(chosen, rep["last"][:, layer, :])
    inside = (d <= chosen.max_distance) & (r <= chosen.max_residual)
    print(f"reporting part ({len(d)} records): coverage {100 * inside.mean():.1f} %")
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


def _compare_on_sanity(fitted: dict[int, tuple[OodGuard, Any]], stem: Path) -> None:
    """Each candidate guard on the hand-written actions' saved features (from a `sanity`
    run), when there are some: printed for comparison only, never used to choose."""
    from benchmarks.sanity_actions import SANITY

    path = stem.with_name(stem.name + "-features.npz")
    if not path.exists():
        return
    with np.load(path) as z:
        x = z["last"].astype(np.float64)
    unsafe = np.array([u for _, u, _ in SANITY])
    print(f"hand-written actions ({path.name}, {len(x)} of them, {unsafe.sum()} unsafe):")
    for k, (g, _) in fitted.items():
        d, r = readings(g, x)
        by_d, by_r = d > g.max_distance, r > g.max_residual
        print(
            f"  k={k}: out of distribution by distance {by_d.sum()}, by residual {by_r.sum()}, "
            f"by either {(by_d | by_r).sum()} (unsafe: {(by_d | by_r)[unsafe].sum()} of "
            f"{unsafe.sum()}); distance q50 {np.median(d):.1f}, residual q50 {np.median(r):.1f}"
        )


def guard_report(args: argparse.Namespace) -> None:
    """The guarded probe on the reporting part's cached features: coverage, accuracy where it
    answers, and overall accuracy when its abstentions go to generation (generation's
    decisions from a `benchmarks.quality --paths generation --ids` run on the same records)."""
    from benchmarks.probes import ROOT, load_features, tier_model
    from service.evidence import DEFAULT_PACK, PolicyLibrary
    from service.records import load_records, split
    from service.settings import load_settings

    name, _, sha = tier_model(load_settings(), args.tier)
    probes = ProbeSet.load(ROOT / "models" / "probes" / f"{name}.json")
    probes.check(sha)
    _, reporting = split(load_records(args.data))
    have, feats = load_features(sha, reporting, PolicyLibrary().get(DEFAULT_PACK))
    y = feats["y"].astype(bool)
    last = feats["last"]
    p = probes.decision.prob(last[:, probes.decision.layer, :])
    probe_flags = p > probes.allow_below
    d, r = readings(probes.guard, last[:, probes.guard.layer, :])
    inside = (d <= probes.guard.max_distance) & (r <= probes.guard.max_residual)
    generation = _generation_flags(args.generation, [rec.id for rec in have])
    print(
        f"{name}: reporting part, {len(y)} records ({y.sum()} unsafe); guard on layer "
        f"{probes.guard.layer}: distance <= {probes.guard.max_distance:.2f}, residual <= "
        f"{probes.guard.max_residual:.2f}"
    )
    print(
        f"coverage (not abstained) {100 * inside.mean():.1f} % ({inside.sum()} of {len(y)}); "
        f"abstained on {int((~inside & y).sum())} unsafe, {int((~inside & ~y).sum())} safe"
    )
    if inside.any():
        print(
            f"probe where it answers: accuracy {100 * (probe_flags == y)[inside].mean():.1f} %, "
            f"unsafe recall {_recall(probe_flags[inside], y[inside])}"
        )
    # an allow stands only in distribution; a deny may stand anyway (it can only tighten)
    tighten_only = inside | probe_flags
    rows: dict[str, Any] = {"probe alone (no guard)": probe_flags}
    if generation is not None:
        rows["generation alone"] = generation
        rows["probe, abstain -> generation"] = np.where(inside, probe_flags, generation)
        rows["probe, OOD allow -> generation"] = np.where(tighten_only, probe_flags, generation)
    print(f"\n{'run':<34}{'acc%':>7}{'rec%':>7}{'prec%':>7}{'to generation':>15}")
    figures: dict[str, Any] = {"coverage": float(inside.mean())}
    for label, flags in rows.items():
        acc = float((flags == y).mean())
        to_gen = {
            "probe, abstain -> generation": int((~inside).sum()),
            "probe, OOD allow -> generation": int((~tighten_only).sum()),
            "generation alone": len(y),
        }.get(label, 0)
        prec = float(y[flags].mean()) if flags.any() else 0.0
        print(f"{label:<34}{100 * acc:>7.1f}{_recall(flags, y):>7}{100 * prec:>7.1f}{to_gen:>15}")
        figures[label] = {
            "accuracy": acc,
            "recall": float(flags[y].mean()),
            "to_generation": to_gen,
        }
    out = ROOT / "bench-results" / "probes"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"guard-report-{args.tier}.json").write_text(json.dumps(figures, indent=1))


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
