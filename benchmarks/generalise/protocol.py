"""The protocol: leave one training source out, calibrate and choose the thresholds on the
others (each scored by a model trained on the rest), and score the held-out one."""

from __future__ import annotations

from dataclasses import dataclass

import numpy as np

from benchmarks.generalise.data import Data, weights
from benchmarks.generalise.fits import Fit
from benchmarks.sources import TRAINING_SOURCES


def _sig(z: np.ndarray) -> np.ndarray:
    p: np.ndarray = 1.0 / (1.0 + np.exp(-np.clip(z, -50, 50)))
    return p


def auc(y: np.ndarray, s: np.ndarray) -> float:
    from sklearn.metrics import roc_auc_score

    return float(roc_auc_score(y, s)) if 0 < y.sum() < len(y) else float("nan")


def platt(scores: np.ndarray, y: np.ndarray, w: np.ndarray) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1e4, max_iter=1000)
    clf.fit(scores.reshape(-1, 1), y, sample_weight=w)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


@dataclass(frozen=True)
class Thresholds:
    allow_below: float
    deny_above: float


def choose_thresholds(
    p: np.ndarray, y: np.ndarray, source: np.ndarray, recall: float
) -> Thresholds:
    """allow_below: the highest P(unsafe) cut-off that flags `recall` of the unsafe records of
    every source; deny_above: the least P(unsafe) from which, in every source, at least 85 %
    of the records are unsafe (between the two, a human decides)."""
    allow = 1.0
    for s in np.unique(source):
        unsafe = np.sort(p[(source == s) & (y == 1)])
        if len(unsafe):
            k = int(np.floor((1 - recall) * len(unsafe)))
            allow = min(allow, float(unsafe[k]) - 1e-9)
    allow = max(allow, 0.0)
    deny = 1.0 + 1e-9
    for t in np.sort(np.unique(p[p > allow]))[::-1]:
        ok = True
        for s in np.unique(source):
            m = (source == s) & (p >= t)
            if m.sum() and y[m].mean() < 0.85:
                ok = False
        if ok:
            deny = float(t)
        else:
            break
    return Thresholds(allow, max(deny, allow))


def decisions(p: np.ndarray, t: Thresholds) -> np.ndarray:
    return np.where(p <= t.allow_below, "allow", np.where(p >= t.deny_above, "deny", "escalate"))


def scores_of(y: np.ndarray, p: np.ndarray, d: np.ndarray) -> dict[str, float]:
    allowed = d == "allow"
    unsafe, safe = y == 1, y == 0
    return {
        "n": float(len(y)),
        "accuracy": float(((unsafe & ~allowed) | (safe & allowed)).mean()),
        "recall": float((unsafe & ~allowed).sum() / max(unsafe.sum(), 1)),
        "safe_allowed": float((safe & allowed).sum() / max(safe.sum(), 1)),
        "escalate": float((d == "escalate").mean()),
        "auc": auc(y, p),
    }


def inner_calibration(
    fit: Fit, train: Data, recall: float
) -> tuple[tuple[float, float], Thresholds]:
    """Platt scaling and thresholds from scores each training source got from a model
    trained on the other training sources."""
    names = np.unique(train.source)
    raw = np.zeros(len(train.y))
    for s in names:
        inner = train.source != s
        raw[~inner] = fit(train.subset(inner))(train.subset(~inner))
    ab = platt(raw, train.y, weights(train))
    p = _sig(ab[0] * raw + ab[1])
    return ab, choose_thresholds(p, train.y, train.source, recall)


@dataclass
class Fold:
    held_out: str
    p: np.ndarray
    y: np.ndarray
    thresholds: Thresholds
    scores: dict[str, float]


def leave_one_source_out(fit: Fit, data: Data, recall: float) -> list[Fold]:
    folds = []
    for s in TRAINING_SOURCES:
        test_mask = data.source == s
        if not test_mask.any():
            continue
        train = data.subset(~test_mask)
        test = data.subset(test_mask)
        ab, t = inner_calibration(fit, train, recall)
        p = _sig(ab[0] * fit(train)(test) + ab[1])
        folds.append(Fold(s, p, test.y, t, scores_of(test.y, p, decisions(p, t))))
    return folds


def within_source_auc(fit: Fit, data: Data, folds: int = 5) -> dict[str, float]:
    """AUC inside each source, five folds by group: what a reader learns of a source it was
    trained on. Far above the held-out AUC, the sources disagree rather than the reader
    being blind."""
    from sklearn.model_selection import GroupKFold

    out = {}
    for s in TRAINING_SOURCES:
        part = data.subset(data.source == s)
        if len(part.y) < 2 * folds:
            continue
        raw = np.zeros(len(part.y))
        for train, _ in GroupKFold(folds).split(part.y, part.y, part.groups):
            keep = np.zeros(len(part.y), bool)
            keep[train] = True
            raw[~keep] = fit(part.subset(keep))(part.subset(~keep))
        out[s] = auc(part.y, raw)
    return out


def macro(folds: list[Fold]) -> dict[str, float]:
    keys = ("accuracy", "recall", "safe_allowed", "escalate", "auc")
    out = {k: float(np.mean([f.scores[k] for f in folds])) for k in keys}
    out["min_recall"] = float(min(f.scores["recall"] for f in folds))
    return out
