"""Fitting the probes' heads: logistic regressions on cached features, the layer and C chosen by
cross-validated AUC, Platt scaling on out-of-fold scores, the decision thresholds, and the
item probe (a head per pack rule); the folds hold out agent profiles or scenarios."""

from __future__ import annotations

import itertools
from collections.abc import Callable
from typing import Any

import numpy as np
from sklearn.linear_model import LogisticRegression
from sklearn.metrics import roc_auc_score
from sklearn.model_selection import GroupKFold, StratifiedKFold
from sklearn.preprocessing import StandardScaler

from benchmarks.records import Record
from service.decision.probes import ItemProbe, LinearProbe, cite, evidence_digest
from service.evidence import PolicyPack

C_GRID = (0.001, 0.01, 0.1, 1.0)
FOLDS = 5
SEED = 0


def fit_logistic(x: Any, y: Any, c: float) -> tuple[Any, Any, Any]:
    """(scaler, classifier, raw-logit function) fitted on x, y."""
    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=SEED)
    clf.fit(scaler.transform(x), y)
    return scaler, clf, lambda v: clf.decision_function(scaler.transform(v))


def fitted_probe(
    layer: int, x: Any, y: Any, c: float, platt_ab: tuple[float, float]
) -> LinearProbe:
    """The probe fitted on all of x, y, with the Platt scaling fitted on out-of-fold scores."""
    scaler, clf, _ = fit_logistic(x, y, c)
    return LinearProbe(
        layer=layer,
        mean=scaler.mean_,
        scale=scaler.scale_,
        coef=clf.coef_[0],
        intercept=float(clf.intercept_[0]),
        platt_a=platt_ab[0],
        platt_b=platt_ab[1],
    )


def out_of_fold(x: Any, y: Any, c: float, groups: Any = None) -> Any:
    """Raw logits for every row from a model that did not see its fold (grouped by record
    when `groups` is given, so a record's rules never straddle train and test)."""

    scores = np.zeros(len(y))
    if groups is None:
        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=SEED).split(x, y)
    else:
        folds = GroupKFold(FOLDS).split(x, y, groups)
    for train, test in folds:
        _, _, logit = fit_logistic(x[train], y[train], c)
        scores[test] = logit(x[test])
    return scores


def roc_auc(y: Any, s: Any) -> float:

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def choose_layer(
    xs: dict[int, Any], y: Any, groups: Any = None
) -> tuple[int, float, Any, list[dict[str, Any]]]:
    """For each layer (and C), cross-validated AUC and accuracy; the best (layer, C) and its
    out-of-fold logits. Printed as it goes."""
    rows = []
    best: tuple[float, int, float, Any] = (-1.0, -1, 0.0, None)
    for layer, x in xs.items():
        per_c = {}
        for c in C_GRID:
            s = out_of_fold(x, y, c, groups)
            per_c[c] = (roc_auc(y, s), s)
        c_best = max(per_c, key=lambda k: per_c[k][0])
        auc, s = per_c[c_best]
        acc = float(((s > 0) == (y == 1)).mean())
        rows.append({"layer": layer, "auc": auc, "accuracy": acc, "C": c_best})
        print(f"  layer {layer:>2}: AUC {auc:.3f}  accuracy {100 * acc:.1f} %  (C={c_best})")
        if auc > best[0]:
            best = (auc, layer, c_best, s)
    return best[1], best[2], best[3], rows


def platt(scores: Any, y: Any) -> tuple[float, float]:

    clf = LogisticRegression(C=1e4, max_iter=1000).fit(scores.reshape(-1, 1), y)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def sigmoid(z: Any) -> Any:
    return 1.0 / (1.0 + np.exp(-z))


def ece(p: Any, y: Any, bins: int = 10) -> float:
    """Expected calibration error of P(unsafe) in equal-width bins."""
    edges = np.linspace(0, 1, bins + 1)
    total = 0.0
    for lo, hi in itertools.pairwise(edges):
        inside = (p >= lo) & ((p < hi) | (hi == 1.0))
        if inside.any():
            total += inside.mean() * abs(p[inside].mean() - y[inside].mean())
    return float(total)


def decision_thresholds(p: Any, y: Any, recall: float) -> tuple[float, float]:
    """allow_below: the largest P(unsafe) cut-off that still flags `recall` of the unsafe
    records; deny_above: the least P(unsafe) above which at least 90 % are unsafe (between
    the two, a human decides)."""
    unsafe = np.sort(p[y == 1])
    k = int(np.floor((1 - recall) * len(unsafe)))
    allow_below = float(unsafe[k] - 1e-6) if len(unsafe) else 0.5
    deny_above = 1.0
    for t in np.sort(np.unique(p))[::-1]:
        if (p >= t).sum() >= 5 and y[p >= t].mean() >= 0.9:
            deny_above = float(t)
    return max(0.0, allow_below), max(deny_above, allow_below)


def evidence_prf(cited: list[set[str]], gold: list[set[str]]) -> dict[str, float]:
    hit = sum(len(c & g) for c, g in zip(cited, gold, strict=True))
    n_cited = sum(len(c) for c in cited)
    n_gold = sum(len(g) for g in gold)
    prec = hit / n_cited if n_cited else 0.0
    rec = hit / n_gold if n_gold else 0.0
    f1 = 2 * prec * rec / (prec + rec) if prec + rec else 0.0
    return {"precision": prec, "recall": rec, "f1": f1}


def _fit_item_heads(x: Any, labels: Any, c: float) -> tuple[Any, Any, Any]:
    """(scaler, coef, intercept): a logistic regression per label column."""
    scaler = StandardScaler().fit(x)
    z = scaler.transform(x)
    coef = np.zeros((labels.shape[1], x.shape[1]))
    intercept = np.zeros(labels.shape[1])
    for k in range(labels.shape[1]):
        rate = labels[:, k].mean()
        if 0 < rate < 1:
            clf = LogisticRegression(C=c, max_iter=2000, random_state=SEED)
            clf.fit(z, labels[:, k])
            coef[k], intercept[k] = clf.coef_[0], clf.intercept_[0]
        else:  # a rule never (or always) gold here: its base rate
            rate = min(max(rate, 1e-3), 1 - 1e-3)
            intercept[k] = np.log(rate / (1 - rate))
    return scaler, coef, intercept


def _item_probs(model: tuple[Any, Any, Any], x: Any) -> Any:
    scaler, coef, intercept = model
    return sigmoid(scaler.transform(x) @ coef.T + intercept)


def _best_item_read(
    x: Any, labels: Any, groups: Any, f1_at: Callable[[Any, float], float]
) -> tuple[float, float, float]:
    """(out-of-fold evidence F1, C, citation threshold), the best over C and threshold for
    the item heads on one layer's rows."""
    layer_best = (-1.0, 0.0, 0.5)
    for c in C_GRID:
        p = np.zeros(labels.shape)
        for train_idx, test_idx in GroupKFold(FOLDS).split(x, labels, groups):
            p[test_idx] = _item_probs(
                _fit_item_heads(x[train_idx], labels[train_idx], c), x[test_idx]
            )
        for t in np.linspace(0.05, 0.95, 19):
            layer_best = max(layer_best, (f1_at(p, float(t)), c, float(t)))
    return layer_best


def fit_items(
    rows: Any,
    candidates: list[int],
    feats: dict[str, Any],
    keep: Any,
    groups: Any,
    pack: PolicyPack,
    max_cited: int,
) -> tuple[ItemProbe, list[dict[str, Any]]]:
    """The item probe: for each of the pack's rules, a logistic regression on the decision's
    vector (unsafe records with gold, multi-label), the layer, C and citation threshold
    chosen by out-of-fold evidence F1 (folds by profile or scenario). Printed as it goes."""
    pack_ids = [item.id for item in pack.items]
    at = {item_id: k for k, item_id in enumerate(pack_ids)}
    idx = np.flatnonzero(keep)
    labels = np.array([[int(x in feats["gold"][i]) for x in pack_ids] for i in idx])
    gold = [feats["gold"][i] for i in idx]

    def f1_at(p: Any, t: float) -> float:
        cited = []
        for row, i in zip(p, idx, strict=True):
            ids = feats["ids"][i]
            cited.append(set(cite(row[[at[x] for x in ids]], ids, t, max_cited)))
        return evidence_prf(cited, gold)["f1"]

    by_layer: list[dict[str, Any]] = []
    best: tuple[float, int, float, float] = (-1.0, -1, 0.0, 0.5)
    for layer in candidates:
        layer_best = _best_item_read(rows[idx, layer, :], labels, groups, f1_at)
        by_layer.append({"layer": layer, "f1": layer_best[0], "c": layer_best[1]})
        print(
            f"  layer {layer:>2}: out-of-fold evidence F1 {100 * layer_best[0]:.1f} % "
            f"(C={layer_best[1]}, cite from {layer_best[2]:.2f})"
        )
        best = max(best, (layer_best[0], layer, layer_best[1], layer_best[2]))
    f1, layer, c, threshold = best
    scaler, coef, intercept = _fit_item_heads(rows[idx, layer, :], labels, c)
    print(
        f"chosen layer {layer} (C={c}): cite from P(applies) >= {threshold:.2f}, F1 {100 * f1:.1f} %"
    )
    probe = ItemProbe(
        layer=layer,
        ids=tuple(pack_ids),
        digests=tuple(evidence_digest(item) for item in pack.items),
        mean=scaler.mean_,
        scale=scaler.scale_,
        coef=coef,
        intercept=intercept,
        threshold=threshold,
    )
    return probe, by_layer


def profile_groups(records: list[Record]) -> Any:
    """One group per agent profile (ASSEBench's domains), and one per scenario of a
    hand-written set (a request and its twins in the same context)."""
    names: dict[str, int] = {}

    def key(r: Record) -> str:
        if "scenario" in r.raw:
            return f"scenario:{r.raw['scenario']}"
        return f"profile:{r.request.agent.profile or ''}"

    return np.array([names.setdefault(key(r), len(names)) for r in records])
