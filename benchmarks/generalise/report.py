"""`table`: every reader through the protocol on the cached records, its macro means as it
goes, then the per-source table of the best reader of each kind, written to generalise.json."""

from __future__ import annotations

import argparse
import json
import statistics
import time
from typing import Any

import numpy as np

from benchmarks.generalise.data import LAYERS, Data, load_data
from benchmarks.generalise.fits import readers
from benchmarks.generalise.minilm import minilm_features
from benchmarks.generalise.protocol import leave_one_source_out, macro, within_source_auc
from benchmarks.probes.features import tier_model
from benchmarks.sources import TRAINING_SOURCES
from service.settings import load_settings


def _pct(v: float) -> str:
    return "  -  " if v != v else f"{100 * v:5.1f}"


def table(args: argparse.Namespace) -> None:
    settings = load_settings()
    _, _, sha = tier_model(settings, args.tier)
    data = load_data(TRAINING_SOURCES, sha)
    have = ~np.isnan(data.edge["mean"][:, 0, 0]) if data.edge else np.zeros(len(data.y), bool)
    if args.no_edge:
        have[:] = False
    for s in TRAINING_SOURCES:
        m = data.source == s
        print(
            f"{s}: {m.sum()} records ({data.y[m].sum()} unsafe), {int((have & m).sum())} with "
            "edge features"
        )
    # every reader is scored on the same records: those with edge features, when there are
    sample = data.subset(have) if have.any() else data
    if not have.any():
        sample.edge = {}
    sample.vectors["minilm"] = minilm_features(sample)
    results = []
    for name, fit in readers(bool(have.any())):
        if args.only and not any(o in name for o in args.only):
            continue
        started = time.monotonic()
        folds = leave_one_source_out(fit, sample, args.recall)
        m = macro(folds)
        within = within_source_auc(fit, sample) if args.within else {}
        for f in folds:
            f.scores["within_auc"] = within.get(f.held_out, float("nan"))
        results.append((name, m, folds))
        print(
            f"  {name:<28} macro acc {_pct(m['accuracy'])}  recall {_pct(m['recall'])} "
            f"(min {_pct(m['min_recall'])})  safe allowed {_pct(m['safe_allowed'])}  "
            f"escalate {_pct(m['escalate'])}  AUC {m['auc']:.3f}  "
            f"[{time.monotonic() - started:.0f} s]",
            flush=True,
        )
    out = args.out
    out.mkdir(parents=True, exist_ok=True)
    rows = []
    for name, m, folds in results:
        rows.append(
            {
                "reader": name,
                "macro": m,
                "folds": [
                    {"held_out": f.held_out, **f.scores, **vars(f.thresholds)} for f in folds
                ],
            }
        )
    (out / "generalise.json").write_text(json.dumps(rows, indent=1))
    print_table(rows, sample, data)


def print_table(rows: list[dict[str, Any]], sample: Data, data: Data) -> None:
    best_by_kind: dict[str, dict[str, Any]] = {}
    for row in rows:
        kind = row["reader"].split(" ")[0].split("@")[0]
        key = (
            row["macro"]["accuracy"] if row["macro"]["min_recall"] >= 0.9 else -1,
            row["macro"]["auc"],
        )
        old = best_by_kind.get(kind)
        if old is None or key > old["_key"]:
            best_by_kind[kind] = row | {"_key": key}
    print("\nHeld out one source at a time (thresholds from the other sources):")
    head = (
        f"{'reader':<30} {'held out':<16} {'acc':>6} {'recall':>7} {'safe ok':>8} {'escal':>6} "
        f"{'AUC':>6} {'AUC inside':>10}"
    )
    print(head)
    for row in best_by_kind.values():
        for f in row["folds"]:
            print(
                f"{row['reader']:<30} {f['held_out']:<16} {_pct(f['accuracy']):>6} "
                f"{_pct(f['recall']):>7} {_pct(f['safe_allowed']):>8} {_pct(f['escalate']):>6} "
                f"{f['auc']:6.3f} {f.get('within_auc', float('nan')):10.3f}"
            )
        m = row["macro"]
        print(
            f"{row['reader']:<30} {'macro mean':<16} {_pct(m['accuracy']):>6} {_pct(m['recall']):>7} "
            f"{_pct(m['safe_allowed']):>8} {_pct(m['escalate']):>6} {m['auc']:6.3f}"
        )
    if sample.edge and sample.edge_ms is not None and np.isfinite(sample.edge_ms).any():
        print(
            f"\nedge prefill per request (shallow, to block {max(LAYERS)}): p50 "
            f"{statistics.median(sample.edge_ms[np.isfinite(sample.edge_ms)]):.0f} ms"
        )
