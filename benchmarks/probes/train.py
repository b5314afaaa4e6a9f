"""Training the probes (`benchmarks.probes train`): on the tuning part's cached features, the
decision probe, its out-of-distribution guard, the relevance probe and the item probe, every
figure printed, a plot of accuracy by layer, and models/probes/<model>.json."""

from __future__ import annotations

import argparse
import time
from dataclasses import dataclass
from pathlib import Path
from typing import Any

import matplotlib

matplotlib.use("Agg")  # files only, no display
import matplotlib.pyplot as plt
import numpy as np
from sklearn.feature_extraction.text import TfidfVectorizer
from sklearn.linear_model import LogisticRegression
from sklearn.model_selection import GroupKFold, StratifiedKFold

from benchmarks.action_sets import named_set, set_label
from benchmarks.probes.features import ROOT, decision_rows, load_features, tier_model
from benchmarks.probes.fit import (
    FOLDS,
    SEED,
    choose_layer,
    decision_thresholds,
    ece,
    evidence_prf,
    fit_items,
    fitted_probe,
    out_of_fold,
    platt,
    profile_groups,
    roc_auc,
    sigmoid,
)
from benchmarks.probes.guard import fit_guard_cv
from benchmarks.records import Record, load_records, split
from service.decision.ood import OodGuard
from service.decision.probes import PROBE_PROMPT_VERSION, LinearProbe, ProbeSet, cite
from service.evidence import DEFAULT_PACK, PolicyLibrary, PolicyPack
from service.settings import load_settings


def train(args: argparse.Namespace) -> None:
    name, _, sha = tier_model(load_settings(), args.tier)
    pack = PolicyLibrary().get(DEFAULT_PACK)
    have, feats, extra, source = _training_set(args, name, sha, pack)
    y = feats["y"]
    candidates = _candidates(feats["last"].shape[1], args.layer_stride)
    # ASSEBench's agent profiles are strong label cues (the system-administrator profile is
    # 88 of 90 unsafe), so folds that split records at random reward learning the domain. The
    # folds hold out whole profiles instead: every score is for a domain the probe never saw,
    # which is what an operator's own agents are.
    profiles = profile_groups(have)
    decision = _fit_decision(args, have, feats, candidates, profiles, source, list(extra))
    rows = decision_rows(feats, args.decision_read)
    guard, guard_figures = _fit_guard(args, rows, profiles, decision)
    print("\nrelevance probe (end of each roll-call line), unsafe records, grouped 5-fold CV:")
    keep = np.array([bool(g) for g in feats["gold"]]) & (y == 1)
    relevance, relevance_threshold, rel_rows = _fit_relevance(feats, keep, candidates, args)
    print(
        "\nitem probe (each of the pack's rules, from the decision's vector), unsafe records, "
        "5-fold CV by profile or scenario:"
    )
    items, item_rows = fit_items(
        rows, candidates, feats, keep, profiles[keep], pack, args.max_cited
    )
    probes = ProbeSet(
        model=name,
        model_sha256=sha,
        prompt_version=PROBE_PROMPT_VERSION,
        decision=decision.probe,
        relevance=relevance,
        allow_below=decision.allow_below,
        deny_above=decision.deny_above,
        relevance_threshold=relevance_threshold,
        guard=guard,
        decision_read=args.decision_read,
        items=items,
        trained={
            "guard": guard_figures,
            "data": args.data.name,
            "part": "tuning",
            "extra": {label: int((source == label).sum()) for label in extra},
            "records": len(have),
            "unsafe": int(y.sum()),
            "seed": SEED,
            "folds": FOLDS,
            "decision_folds": args.cv,
            "target_recall": args.recall,
            "decision_by_layer": decision.by_layer,
            "relevance_by_layer": rel_rows,
            "items_by_layer": item_rows,
            "at": time.strftime("%Y-%m-%d"),
        },
    )
    _write(probes, name, decision.by_layer, rel_rows, args.tier)


def _candidates(n_layers: int, stride: int) -> list[int]:
    """The layers tried: every `stride`th, and the last."""
    return [layer for layer in range(n_layers) if layer % stride == 0 or layer == n_layers - 1]


def _fit_guard(
    args: argparse.Namespace, rows: Any, profiles: Any, decision: DecisionFit
) -> tuple[OodGuard, dict[str, Any]]:
    """The out-of-distribution guard on the decision probe's layer, folds by agent profile."""
    layer = decision.probe.layer
    print("\nout-of-distribution guard on the same layer, folds by agent profile:")
    return fit_guard_cv(
        rows[:, layer, :],
        layer,
        args.guard_components[0],
        args.guard_quantile,
        profiles,
        decision.probe.score(rows[:, layer, :]),
    )


def _training_set(
    args: argparse.Namespace, name: str, sha: str, pack: PolicyPack
) -> tuple[list[Record], dict[str, Any], dict[str, list[Record]], Any]:
    """The tuning part's records with cached features, and the --extra sets beside them:
    the records, their features, the extra sets by label and each record's source."""
    tuning, _ = split(load_records(args.data))
    extra = {set_label(n): named_set(n) for n in args.extra}
    have, feats = load_features(sha, tuning + [r for rs in extra.values() for r in rs], pack)
    y = feats["y"]
    ids_of = {label: {r.id for r in rs} for label, rs in extra.items()}
    source = np.array(
        [next((k for k, v in ids_of.items() if r.id in v), "assebench") for r in have]
    )
    print(f"{name}: tuning part, {len(have)} records with features ({y.sum()} unsafe)")
    for label in ["assebench", *extra]:
        mine = source == label
        print(f"  {label}: {mine.sum()} records ({y[mine].sum()} unsafe)")
    if len(have) < 40:
        raise SystemExit("too few records: run `extract` first")
    return have, feats, extra, source


@dataclass(frozen=True)
class DecisionFit:
    """The decision probe, fitted on all the tuning records, and its thresholds."""

    probe: LinearProbe
    allow_below: float
    deny_above: float
    by_layer: list[dict[str, Any]]


def _fit_decision(
    args: argparse.Namespace,
    have: list[Record],
    feats: dict[str, Any],
    candidates: list[int],
    profiles: Any,
    source: Any,
    extra: list[str],
) -> DecisionFit:
    """The layer and C by cross-validated AUC (folds by --cv), the other kind of folds and
    the words alone for comparison, Platt scaling and the thresholds; printed as it goes."""
    y = feats["y"]
    cv = profiles if args.cv == "profiles" else None
    n_profiles = len(set(profiles))
    print(
        f"\ndecision probe ({args.decision_read}), 5-fold CV on the tuning part, "
        + (
            f"folds by agent profile ({n_profiles} profiles):"
            if cv is not None
            else "random folds:"
        )
    )
    rows = decision_rows(feats, args.decision_read)
    print(f"  reading {args.decision_read}")
    xs = {layer: rows[:, layer, :] for layer in candidates}
    layer, c, oof, dec_rows = choose_layer(xs, y, cv)
    other = out_of_fold(xs[layer], y, c, None if cv is not None else profiles)
    print(
        f"  layer {layer} with "
        + ("random folds" if cv is not None else "folds by agent profile")
        + f" instead: AUC {roc_auc(y, other):.3f}, accuracy {100 * ((other > 0) == (y == 1)).mean():.1f} %"
    )
    text_baseline(have, y, profiles)
    a, b = platt(oof, y)
    p_oof = sigmoid(a * oof + b)
    allow_below, deny_above = decision_thresholds(p_oof, y, args.recall)
    flagged = p_oof > allow_below
    print(
        f"chosen layer {layer} (C={c}): out-of-fold AUC {roc_auc(y, oof):.3f}, ECE "
        f"{ece(p_oof, y):.3f}; allow when P(unsafe) <= {allow_below:.3f} (recall "
        f"{100 * flagged[y == 1].mean():.1f} %, accuracy {100 * (flagged == (y == 1)).mean():.1f} %)"
        f", deny from {deny_above:.3f}"
    )
    if extra:
        _decision_by_source(y, oof, flagged, source, extra)
    decision = fitted_probe(layer, xs[layer], y, c, (a, b))
    return DecisionFit(decision, allow_below, deny_above, dec_rows)


def _decision_by_source(y: Any, oof: Any, flagged: Any, source: Any, extra: list[str]) -> None:
    print("  out of fold, by source:")
    for label in ["assebench", *extra]:
        mine = source == label
        ym, fm = y[mine], flagged[mine]
        print(
            f"    {label:<26} AUC {roc_auc(ym, oof[mine]):.3f}  accuracy "
            f"{100 * (fm == (ym == 1)).mean():.1f} %  unsafe recall "
            f"{100 * fm[ym == 1].mean():.1f} %  safe allowed {100 * (~fm[ym == 0]).mean():.1f} %"
        )


def _fit_relevance(
    feats: dict[str, Any], keep: Any, candidates: list[int], args: argparse.Namespace
) -> tuple[LinearProbe, float, list[dict[str, Any]]]:
    """The relevance probe on the roll-call lines of the records in `keep`, its citation
    threshold by out-of-fold evidence F1, and its figures by layer; printed as it goes."""
    rxs_all, ry, groups = relevance_rows(feats, keep)
    rxs = {k: rxs_all[k] for k in candidates}
    r_layer, r_c, r_oof, rel_rows = choose_layer(rxs, ry, groups)
    ra, rb = platt(r_oof, ry)
    r_p = sigmoid(ra * r_oof + rb)
    # the citation threshold that maximises out-of-fold evidence F1
    idx = np.flatnonzero(keep)
    best_t, best_f1 = 0.5, -1.0
    for t in np.linspace(0.05, 0.95, 19):
        cited, gold, at = [], [], 0
        for i in idx:
            m = len(feats["ids"][i])
            cited.append(set(cite(r_p[at : at + m], feats["ids"][i], t, args.max_cited)))
            gold.append(feats["gold"][i])
            at += m
        f1 = evidence_prf(cited, gold)["f1"]
        if f1 > best_f1:
            best_t, best_f1 = float(t), f1
    print(
        f"chosen layer {r_layer} (C={r_c}): pair AUC {roc_auc(ry, r_oof):.3f}; cite from "
        f"P(applies) >= {best_t:.2f}: out-of-fold evidence F1 {100 * best_f1:.1f} %"
    )
    return fitted_probe(r_layer, rxs[r_layer], ry, r_c, (ra, rb)), best_t, rel_rows


def _write(
    probes: ProbeSet,
    name: str,
    dec_rows: list[dict[str, Any]],
    rel_rows: list[dict[str, Any]],
    tier: str,
) -> None:
    out = ROOT / "models" / "probes" / f"{name}.json"
    probes.save(out)
    print(f"\nwrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")
    plot_layers(name, dec_rows, rel_rows, ROOT / "docs" / "img" / f"probe-layers-{tier}.png")


def text_baseline(records: list[Record], y: Any, profiles: Any) -> None:
    """What the words alone give: TF-IDF of the request and a logistic regression, under both
    kinds of folds. A probe that does no better than this has learnt the data set's wording."""
    texts = [r.request.model_dump_json(exclude_none=True) for r in records]
    for label, folds in (
        ("random folds", StratifiedKFold(FOLDS, shuffle=True, random_state=SEED).split(texts, y)),
        ("folds by profile", GroupKFold(FOLDS).split(texts, y, profiles)),
    ):
        scores = np.zeros(len(y))
        for train_idx, test_idx in folds:
            vec = TfidfVectorizer(min_df=2, sublinear_tf=True, max_features=20_000)
            x_train = vec.fit_transform([texts[i] for i in train_idx])
            clf = LogisticRegression(C=10.0, max_iter=2000).fit(x_train, y[train_idx])
            scores[test_idx] = clf.decision_function(vec.transform([texts[i] for i in test_idx]))
        acc = float(((scores > 0) == (y == 1)).mean())
        print(
            f"  text baseline (TF-IDF + LR), {label}: AUC {roc_auc(y, scores):.3f}, accuracy {100 * acc:.1f} %"
        )


def relevance_rows(feats: dict[str, Any], keep: Any) -> tuple[dict[int, Any], Any, Any]:
    """(layer -> pair features, labels, record index) over the records in `keep`."""
    n_layers = feats["last"].shape[1]
    xs: dict[int, list[Any]] = {layer: [] for layer in range(n_layers)}
    y, groups = [], []
    for i in np.flatnonzero(keep):
        marks, ids, gold = feats["marks"][i], feats["ids"][i], feats["gold"][i]
        for j, item in enumerate(ids):
            for layer in range(n_layers):
                xs[layer].append(marks[layer, j])
            y.append(int(item in gold))
            groups.append(i)
    return {k: np.stack(v) for k, v in xs.items()}, np.array(y), np.array(groups)


def plot_layers(name: str, dec: list[dict[str, Any]], rel: list[dict[str, Any]], out: Path) -> None:
    fig, ax = plt.subplots(figsize=(7, 3.6))
    ax.plot(
        [r["layer"] for r in dec], [r["accuracy"] for r in dec], "o-", label="decision accuracy"
    )
    ax.plot([r["layer"] for r in dec], [r["auc"] for r in dec], "s--", label="decision AUC")
    ax.plot(
        [r["layer"] for r in rel], [r["auc"] for r in rel], "^:", label="evidence relevance AUC"
    )
    ax.set_xlabel("layer (output of block N)")
    ax.set_ylabel("5-fold CV, tuning part")
    ax.set_ylim(0.4, 1.0)
    ax.grid(alpha=0.3)
    ax.legend(loc="lower right", fontsize=8)
    ax.set_title(f"Linear probes by layer: {name}", fontsize=10)
    fig.tight_layout()
    out.parent.mkdir(parents=True, exist_ok=True)
    fig.savefig(out, dpi=110)
    plt.close(fig)
    print(f"wrote {out.relative_to(ROOT)}")
