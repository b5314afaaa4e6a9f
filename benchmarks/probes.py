"""Probes on hidden states (issue #9): extract features, train, report.

    .venv/bin/python -m benchmarks.probes extract --tier edge [--part all] [--limit N]
    .venv/bin/python -m benchmarks.probes train --tier edge
    .venv/bin/python -m benchmarks.probes report --tier edge
    .venv/bin/python -m benchmarks.probes guard --tier edge    # the out-of-distribution guard
    .venv/bin/python -m benchmarks.probes ids --tier edge     # records with cached features
    .venv/bin/python -m benchmarks.probes guard-report --tier edge --generation RESULTS.json
    .venv/bin/python -m benchmarks.probes sanity --tier edge   # hand-written, unlike the data

`extract` renders each ASSEBench record as the probe prompt (the service's prompt, the default
pack whole, and a roll-call line per rule after the action), runs one prefill with llama.cpp's
eval callback and saves, for every layer but the last, the residual stream at the prompt's last
token and at the end of each roll-call line, and (beside them, under `...-span`) its mean over
the proposed action's tokens and its state where the action ends. Features are cached on disk,
keyed by the model's
sha256 and the probe prompt version, so training is cheap to repeat; records go in a seeded,
label-balanced order, so an interrupted run still leaves a balanced sample.

`train` fits, on the tuning part only, a logistic regression per layer for the decision (safe
or unsafe, at the last token or the action's mean) and for evidence relevance (rule in the
record's gold rules, at its roll-call line), picks each layer by 5-fold cross-validated AUC,
calibrates with Platt scaling on out-of-fold scores, tunes the thresholds, fits the item probe
(a regression per pack rule on the decision's vector, by out-of-fold evidence F1), prints every
figure, plots accuracy by layer and writes models/probes/<model>.json with an
out-of-distribution guard (`guard` fits
the guard alone; benchmarks/probe_guard.py). `report` and `guard-report` score the written
probe on the reporting part's cached features; `sanity` runs hand-written actions through the
service (benchmarks/probe_sanity.py)."""

from __future__ import annotations

import argparse
import asyncio
import hashlib
import itertools
import json
import time
from collections import Counter
from pathlib import Path
from typing import TYPE_CHECKING, Any

import numpy as np

from benchmarks import probe_guard, probe_sanity
from benchmarks.action_sets import named_set, set_label
from benchmarks.probe_guard import fit_guard_cv
from benchmarks.quality import DEFAULT_DATA, gold_ids
from benchmarks.records import Record, load_records, split
from service.evidence import DEFAULT_PACK, PolicyLibrary, PolicyPack
from service.grammar import DECISIONS
from service.probes import (
    PROBE_PROMPT_VERSION,
    ItemProbe,
    LinearProbe,
    ProbeSet,
    cite,
    evidence_digest,
    model_sha256,
)
from service.prompt import ACTION_SPAN, ROLL_CALL_HEADER, BuiltPrompt, build_prompt
from service.settings import Settings, load_settings
from service.weights import ModelStore

if TYPE_CHECKING:
    from service.backends.llama_cpp import LlamaCppBackend
    from service.schemas import EvaluateRequest, EvidenceItem

ROOT = Path(__file__).resolve().parents[1]
FEATURES = Path.home() / ".cache" / "gatekeeper" / "features"
ORDER_SEED = "gatekeeper-probe-order-1"


def balanced_order(records: list[Record]) -> list[Record]:
    """Unsafe and safe records alternately, each label in a seeded-hash order."""

    def key(r: Record) -> bytes:
        return hashlib.sha256(f"{ORDER_SEED}:{r.id}".encode()).digest()

    unsafe = sorted((r for r in records if r.unsafe), key=key)
    safe = sorted((r for r in records if not r.unsafe), key=key)
    out: list[Record] = []
    for i in range(max(len(unsafe), len(safe))):
        out += unsafe[i : i + 1] + safe[i : i + 1]
    return out


def interleave(a: list[Record], b: list[Record], ratio: int) -> list[Record]:
    """`ratio` records of a for each record of b, until both run out."""
    out: list[Record] = []
    ia = ib = 0
    while ia < len(a) or ib < len(b):
        out += a[ia : ia + ratio]
        ia += ratio
        out += b[ib : ib + 1]
        ib += 1
    return out


def tier_model(settings: Settings, tier: str) -> tuple[str, Path, str]:
    limits = settings.tiers[tier]
    name, path = ModelStore(settings).resolve_tier(limits)
    known = limits.model_sha256 or (
        settings.models[limits.model].sha256 if limits.model in settings.models else None
    )
    return name, path, model_sha256(path, known)


def feature_dir(sha: str) -> Path:
    return FEATURES / f"{sha[:16]}-{PROBE_PROMPT_VERSION}"


def reading_backend(tier: str) -> LlamaCppBackend:
    """The tier's model, loaded with hidden-state reading."""
    from service.backends.llama_cpp import LlamaCppBackend

    settings = load_settings()
    limits = settings.tiers[tier]
    name, path, _ = tier_model(settings, tier)
    backend = LlamaCppBackend(
        name, path, n_ctx=limits.n_ctx, n_threads=limits.n_threads, hidden_states=True
    )
    backend.load()
    return backend


def probe_prompt(
    request: EvaluateRequest,
    backend: Any,
    settings: Settings,
    tier: str,
    evidence: list[EvidenceItem],
) -> BuiltPrompt:
    """The probe prompt, as the service builds it on a probe tier: its prompt and a
    roll-call line per evidence item."""
    limits = settings.tiers[tier]
    return build_prompt(
        request,
        evidence,
        count_tokens=backend.count_tokens,
        max_prompt_tokens=limits.n_ctx - limits.max_tokens,
        max_turn_chars=settings.max_turn_chars,
        roll_call=True,
    )


def extract(args: argparse.Namespace) -> None:
    from tqdm import tqdm

    settings = load_settings()
    name, _, sha = tier_model(settings, args.tier)
    out_dir = feature_dir(sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").write_text(
        json.dumps({"model": name, "sha256": sha, "prompt_version": PROBE_PROMPT_VERSION})
    )
    pack = PolicyLibrary().get(DEFAULT_PACK)
    evidence = list(pack.items)
    if args.set:  # hand-written sets (benchmarks/action_sets.py), whole
        records = [r for name in args.set for r in named_set(name)]
    else:
        tuning, reporting = split(load_records(args.data))
        parts = {"tuning": tuning, "report": reporting}
        if args.part == "all":
            records = interleave(balanced_order(tuning), balanced_order(reporting), 2)
        else:
            records = balanced_order(parts[args.part])
    if args.limit:
        records = records[: args.limit]
    todo = [r for r in records if not (out_dir / f"{r.id}.npz").exists()]
    print(f"{name} ({sha[:12]}): {len(records)} records, {len(todo)} to extract into {out_dir}")
    backend = reading_backend(args.tier)
    layers = tuple(range(backend.n_layers - 1))
    spans = span_dir(sha)
    started = time.monotonic()
    tokens = 0
    done = 0
    try:
        for record in tqdm(todo, unit="rec"):
            if args.max_seconds and time.monotonic() - started > args.max_seconds:
                break  # a bounded chunk: run again to go on where this one stopped
            built = probe_prompt(record.request, backend, settings, args.tier, evidence)
            # the same prefill also reads the action (its mean, and the state where it ends)
            # for `benchmarks.probe_reads` and action-mean probes
            states = backend.hidden_states(
                built.prompt,
                layers=layers,
                marks=(ROLL_CALL_HEADER, *built.marks),
                choices=DECISIONS,
                span=ACTION_SPAN,
            )
            tokens += states.prompt_tokens - states.cached_tokens
            done += 1
            spans.mkdir(exist_ok=True)
            np.savez(
                spans / f"{record.id}.npz",
                mean=states.span_mean.astype(np.float16),
                end=states.marks[:, 0].astype(np.float16),
            )
            np.savez(
                out_dir / f"{record.id}.npz",
                last=states.last.astype(np.float16),
                marks=states.marks[:, 1:].astype(np.float16),
                ids=np.array([item.id for item in built.evidence]),
                prompt_tokens=states.prompt_tokens,
                cached_tokens=states.cached_tokens,
                prefill_s=states.prefill_s,
                p_allow=states.choice_probs.get("allow", np.nan)
                / max(sum(states.choice_probs.values()), 1e-9),
            )
    finally:
        backend.close()
    took = time.monotonic() - started
    print(f"extracted {done} records in {took:.0f} s ({tokens / max(took, 1e-9):.0f} tok/s)")


# ---------------------------------------------------------------------------------------------
# training and reporting


def span_dir(sha: str) -> Path:
    return feature_dir(sha).with_name(feature_dir(sha).name + "-span")


def decision_rows(feats: dict[str, Any], read: str) -> Any:
    """(n, layers, d): what the decision probe reads, the last token or the action's mean."""
    if read == "last":
        return feats["last"]
    if feats["action_mean"] is None:
        raise SystemExit(
            "no cached mean over the action for these records: run "
            "`benchmarks.probe_reads extract` on them first"
        )
    return feats["action_mean"]


def load_features(
    sha: str, records: list[Record], pack: PolicyPack
) -> tuple[list[Record], dict[str, Any]]:
    """The records that have cached features, and their arrays."""
    base = feature_dir(sha)
    have: list[Record] = []
    last, marks, ids, p_allow, prefill = [], [], [], [], []
    for record in records:
        f = base / f"{record.id}.npz"
        if not f.exists():
            continue
        with np.load(f) as z:
            have.append(record)
            last.append(z["last"].astype(np.float32))
            marks.append(z["marks"].astype(np.float32))
            ids.append([str(i) for i in z["ids"]])
            p_allow.append(float(z["p_allow"]))
            prefill.append(float(z["prefill_s"]))
    # the mean over the action's tokens, from `benchmarks.probe_reads extract` (a cache of
    # its own: a record without it leaves the whole read out)
    spans = [span_dir(sha) / f"{r.id}.npz" for r in have]
    action_mean = None
    if have and all(f.exists() for f in spans):
        action_mean = np.stack([np.load(f)["mean"].astype(np.float32) for f in spans])
    feats = {
        "last": np.stack(last) if last else np.zeros((0, 0, 0)),  # (n, layers, d)
        "action_mean": action_mean,  # (n, layers, d) or None
        "marks": marks,  # list of (layers, m, d)
        "ids": ids,
        "p_allow": np.array(p_allow),
        "prefill_s": np.array(prefill),
        "gold": [set(gold_ids(r, pack)) for r in have],
        "y": np.array([r.unsafe for r in have], dtype=int),
    }
    return have, feats


C_GRID = (0.001, 0.01, 0.1, 1.0)
FOLDS = 5
SEED = 0


def _fit(x: Any, y: Any, c: float) -> tuple[Any, Any, Any]:
    """(scaler, classifier, raw-logit function) fitted on x, y."""
    from sklearn.linear_model import LogisticRegression
    from sklearn.preprocessing import StandardScaler

    scaler = StandardScaler().fit(x)
    clf = LogisticRegression(C=c, max_iter=2000, random_state=SEED)
    clf.fit(scaler.transform(x), y)
    return scaler, clf, lambda v: clf.decision_function(scaler.transform(v))


def fitted_probe(
    layer: int, x: Any, y: Any, c: float, platt_ab: tuple[float, float]
) -> LinearProbe:
    """The probe fitted on all of x, y, with the Platt scaling fitted on out-of-fold scores."""
    scaler, clf, _ = _fit(x, y, c)
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
    from sklearn.model_selection import GroupKFold, StratifiedKFold

    scores = np.zeros(len(y))
    if groups is None:
        folds = StratifiedKFold(FOLDS, shuffle=True, random_state=SEED).split(x, y)
    else:
        folds = GroupKFold(FOLDS).split(x, y, groups)
    for train, test in folds:
        _, _, logit = _fit(x[train], y[train], c)
        scores[test] = logit(x[test])
    return scores


def _auc(y: Any, s: Any) -> float:
    from sklearn.metrics import roc_auc_score

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
            per_c[c] = (_auc(y, s), s)
        c_best = max(per_c, key=lambda k: per_c[k][0])
        auc, s = per_c[c_best]
        acc = float(((s > 0) == (y == 1)).mean())
        rows.append({"layer": layer, "auc": auc, "accuracy": acc, "C": c_best})
        print(f"  layer {layer:>2}: AUC {auc:.3f}  accuracy {100 * acc:.1f} %  (C={c_best})")
        if auc > best[0]:
            best = (auc, layer, c_best, s)
    return best[1], best[2], best[3], rows


def platt(scores: Any, y: Any) -> tuple[float, float]:
    from sklearn.linear_model import LogisticRegression

    clf = LogisticRegression(C=1e4, max_iter=1000).fit(scores.reshape(-1, 1), y)
    return float(clf.coef_[0, 0]), float(clf.intercept_[0])


def _sig(z: Any) -> Any:
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
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold
    from sklearn.preprocessing import StandardScaler

    pack_ids = [item.id for item in pack.items]
    at = {item_id: k for k, item_id in enumerate(pack_ids)}
    idx = np.flatnonzero(keep)
    labels = np.array([[int(x in feats["gold"][i]) for x in pack_ids] for i in idx])
    gold = [feats["gold"][i] for i in idx]

    def fit(x: Any, labels: Any, c: float) -> tuple[Any, Any, Any]:
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

    def prob(model: tuple[Any, Any, Any], x: Any) -> Any:
        scaler, coef, intercept = model
        return _sig(scaler.transform(x) @ coef.T + intercept)

    def f1_at(p: Any, t: float) -> float:
        cited = []
        for row, i in zip(p, idx, strict=True):
            ids = feats["ids"][i]
            cited.append(set(cite(row[[at[x] for x in ids]], ids, t, max_cited)))
        return evidence_prf(cited, gold)["f1"]

    by_layer: list[dict[str, Any]] = []
    best: tuple[float, int, float, float] = (-1.0, -1, 0.0, 0.5)
    for layer in candidates:
        x = rows[idx, layer, :]
        layer_best = (-1.0, 0.0, 0.5)
        for c in C_GRID:
            p = np.zeros(labels.shape)
            for train_idx, test_idx in GroupKFold(FOLDS).split(x, labels, groups):
                p[test_idx] = prob(fit(x[train_idx], labels[train_idx], c), x[test_idx])
            for t in np.linspace(0.05, 0.95, 19):
                layer_best = max(layer_best, (f1_at(p, float(t)), c, float(t)))
        by_layer.append({"layer": layer, "f1": layer_best[0], "c": layer_best[1]})
        print(
            f"  layer {layer:>2}: out-of-fold evidence F1 {100 * layer_best[0]:.1f} % "
            f"(C={layer_best[1]}, cite from {layer_best[2]:.2f})"
        )
        best = max(best, (layer_best[0], layer, layer_best[1], layer_best[2]))
    f1, layer, c, threshold = best
    scaler, coef, intercept = fit(rows[idx, layer, :], labels, c)
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


def text_baseline(records: list[Record], y: Any, profiles: Any) -> None:
    """What the words alone give: TF-IDF of the request and a logistic regression, under both
    kinds of folds. A probe that does no better than this has learnt the data set's wording."""
    from sklearn.feature_extraction.text import TfidfVectorizer
    from sklearn.linear_model import LogisticRegression
    from sklearn.model_selection import GroupKFold, StratifiedKFold

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
            f"  text baseline (TF-IDF + LR), {label}: AUC {_auc(y, scores):.3f}, accuracy {100 * acc:.1f} %"
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


def train(args: argparse.Namespace) -> None:
    settings = load_settings()
    name, _, sha = tier_model(settings, args.tier)
    pack = PolicyLibrary().get(DEFAULT_PACK)
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
    n_layers = feats["last"].shape[1]
    stride = args.layer_stride
    candidates = [
        layer for layer in range(n_layers) if layer % stride == 0 or layer == n_layers - 1
    ]

    # ASSEBench's agent profiles are strong label cues (the system-administrator profile is
    # 88 of 90 unsafe), so folds that split records at random reward learning the domain. The
    # folds hold out whole profiles instead: every score is for a domain the probe never saw,
    # which is what an operator's own agents are.
    profiles = profile_groups(have)
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
        + f" instead: AUC {_auc(y, other):.3f}, accuracy {100 * ((other > 0) == (y == 1)).mean():.1f} %"
    )
    text_baseline(have, y, profiles)
    a, b = platt(oof, y)
    p_oof = _sig(a * oof + b)
    allow_below, deny_above = decision_thresholds(p_oof, y, args.recall)
    flagged = p_oof > allow_below
    print(
        f"chosen layer {layer} (C={c}): out-of-fold AUC {_auc(y, oof):.3f}, ECE "
        f"{ece(p_oof, y):.3f}; allow when P(unsafe) <= {allow_below:.3f} (recall "
        f"{100 * flagged[y == 1].mean():.1f} %, accuracy {100 * (flagged == (y == 1)).mean():.1f} %)"
        f", deny from {deny_above:.3f}"
    )
    if extra:
        print("  out of fold, by source:")
        for label in ["assebench", *extra]:
            mine = source == label
            ym, fm = y[mine], flagged[mine]
            print(
                f"    {label:<26} AUC {_auc(ym, oof[mine]):.3f}  accuracy "
                f"{100 * (fm == (ym == 1)).mean():.1f} %  unsafe recall "
                f"{100 * fm[ym == 1].mean():.1f} %  safe allowed {100 * (~fm[ym == 0]).mean():.1f} %"
            )
    decision = fitted_probe(layer, xs[layer], y, c, (a, b))
    print("\nout-of-distribution guard on the same layer, folds by agent profile:")
    guard, guard_figures = fit_guard_cv(
        rows[:, layer, :],
        layer,
        args.guard_components[0],
        args.guard_quantile,
        profiles,
        decision.score(rows[:, layer, :]),
    )

    print("\nrelevance probe (end of each roll-call line), unsafe records, grouped 5-fold CV:")
    keep = np.array([bool(g) for g in feats["gold"]]) & (y == 1)
    rxs_all, ry, groups = relevance_rows(feats, keep)
    rxs = {k: rxs_all[k] for k in candidates}
    r_layer, r_c, r_oof, rel_rows = choose_layer(rxs, ry, groups)
    ra, rb = platt(r_oof, ry)
    r_p = _sig(ra * r_oof + rb)
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
        f"chosen layer {r_layer} (C={r_c}): pair AUC {_auc(ry, r_oof):.3f}; cite from "
        f"P(applies) >= {best_t:.2f}: out-of-fold evidence F1 {100 * best_f1:.1f} %"
    )
    relevance = fitted_probe(r_layer, rxs[r_layer], ry, r_c, (ra, rb))
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
        decision=decision,
        relevance=relevance,
        allow_below=allow_below,
        deny_above=deny_above,
        relevance_threshold=best_t,
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
            "decision_by_layer": dec_rows,
            "relevance_by_layer": rel_rows,
            "items_by_layer": item_rows,
            "at": time.strftime("%Y-%m-%d"),
        },
    )
    out = ROOT / "models" / "probes" / f"{name}.json"
    probes.save(out)
    print(f"\nwrote {out.relative_to(ROOT)} ({out.stat().st_size // 1024} KB)")
    plot_layers(name, dec_rows, rel_rows, ROOT / "docs" / "img" / f"probe-layers-{args.tier}.png")


def probe_cites(
    probes: ProbeSet, pack: PolicyPack, feats: dict[str, Any], rows: Any, i: int, max_cited: int
) -> set[str]:
    """What the service's probe path cites for cached record i: from the item probe when it
    knows every item in the prompt, else from the roll-call's relevance probe."""
    ids = feats["ids"][i]
    by_id = {item.id: item for item in pack.items}
    shown = [by_id[x] for x in ids if x in by_id]
    items = probes.items_for(shown) if len(shown) == len(ids) else None
    if items is not None:
        probs = items.probs(rows[i, items.layer], shown)
        return set(cite(probs, ids, items.threshold, max_cited))
    assert probes.relevance is not None
    probs = probes.relevance.prob(feats["marks"][i][probes.relevance.layer])
    return set(cite(probs, ids, probes.relevance_threshold, max_cited))


def report(args: argparse.Namespace) -> None:
    """Score the written probe on the reporting part's cached features, beside the decision
    the generation path reads from the same prefill's logits (P(allow) at the decision)."""
    settings = load_settings()
    name, _, sha = tier_model(settings, args.tier)
    probes = ProbeSet.load(ROOT / "models" / "probes" / f"{name}.json")
    probes.check(sha)
    pack = PolicyLibrary().get(DEFAULT_PACK)
    _, reporting = split(load_records(args.data))
    have, feats = load_features(sha, reporting, pack)
    y = feats["y"]
    print(f"{name}: reporting part, {len(have)} records with features ({y.sum()} unsafe)")
    p_probe = probes.decision.prob(
        decision_rows(feats, probes.decision_read)[:, probes.decision.layer, :]
    )
    p_logit = 1.0 - feats["p_allow"]
    threshold = settings.tiers[args.tier].allow_threshold or settings.allow_threshold
    rows = {
        "probe": (p_probe, p_probe > probes.allow_below),
        f"logits, P(allow) >= {threshold}": (p_logit, p_logit > 1 - threshold),
        "logits, P(allow) >= 0.5": (p_logit, p_logit > 0.5),
    }
    print(f"\n{'decision read':<30}{'acc%':>7}{'rec%':>7}{'prec%':>7}{'AUC':>7}{'ECE':>7}")
    figures: dict[str, Any] = {}
    for label, (p, flagged) in rows.items():
        acc = float((flagged == (y == 1)).mean())
        rec = float(flagged[y == 1].mean())
        prec = float(y[flagged].mean()) if flagged.any() else 0.0
        figures[label] = {"accuracy": acc, "recall": rec, "precision": prec, "auc": _auc(y, p)}
        figures[label]["ece"] = ece(p, y)
        print(
            f"{label:<30}{100 * acc:>7.1f}{100 * rec:>7.1f}{100 * prec:>7.1f}"
            f"{_auc(y, p):>7.3f}{ece(p, y):>7.3f}"
        )
    if probes.relevance is not None or probes.items is not None:
        rows_all = decision_rows(feats, probes.decision_read)
        cited, gold = [], []
        for i in np.flatnonzero((y == 1) & np.array([bool(g) for g in feats["gold"]])):
            cited.append(probe_cites(probes, pack, feats, rows_all, int(i), args.max_cited))
            gold.append(feats["gold"][i])
        ev = evidence_prf(cited, gold)
        figures["evidence"] = ev
        print(
            f"\nevidence (probe, {len(gold)} unsafe records with gold rules): precision "
            f"{100 * ev['precision']:.1f} %, recall {100 * ev['recall']:.1f} %, "
            f"F1 {100 * ev['f1']:.1f} %"
        )
        # what knowing only the data set gives: always the two rules most often gold on the
        # tuning part's unsafe records
        tuning, _ = split(load_records(args.data))
        counts = Counter(i for r in tuning if r.unsafe for i in gold_ids(r, pack))
        prior = {i for i, _ in counts.most_common(2)}
        base = evidence_prf([prior] * len(gold), gold)
        figures["evidence_prior"] = base
        print(
            f"evidence, the two most frequent gold rules every time ({', '.join(sorted(prior))}): "
            f"precision {100 * base['precision']:.1f} %, recall {100 * base['recall']:.1f} %, "
            f"F1 {100 * base['f1']:.1f} %"
        )
    print(
        f"prefill p50 {np.median(feats['prefill_s']):.2f} s per record (probe path, uncached part)"
    )
    if args.heldout:
        figures["heldout"] = report_heldout(probes, sha, pack, args)
    out = ROOT / "bench-results" / "probes"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report-{args.tier}.json").write_text(json.dumps(figures, indent=1))


def report_heldout(
    probes: ProbeSet, sha: str, pack: PolicyPack, args: argparse.Namespace
) -> dict[str, Any]:
    """The probe, alone and behind its guard, on hand-written sets' cached features: how many
    unsafe requests it would allow (named), accuracy, AUC, and evidence where there is gold."""
    from benchmarks.probe_guard import inside

    print(
        f"\n{'hand-written set':<28}{'n':>4}{'unsafe':>7}{'acc%':>7}{'rec%':>7}{'AUC':>7}"
        f"{'in dist':>8}{'unsafe allowed':>16}{'+ guard':>9}{'evidence F1':>13}"
    )
    figures: dict[str, Any] = {}
    slips: list[str] = []
    for name in args.heldout:
        have, feats = load_features(sha, named_set(name), pack)
        if not have:
            print(f"{set_label(name):<28} no cached features: run `extract --set {name}`")
            continue
        y = feats["y"]
        rows = decision_rows(feats, probes.decision_read)
        x = rows[:, probes.decision.layer, :]
        p = probes.decision.prob(x)
        flagged = p > probes.allow_below
        within = (
            inside(probes.guard, rows[:, probes.guard.layer, :], probes.decision.score(x))
            if probes.guard is not None
            else np.ones(len(y), dtype=bool)
        )
        allowed = (~flagged) & (y == 1)
        guarded = allowed & within  # an allow outside goes to generation
        slips += [
            f"  {set_label(name)} {r.id}: {r.raw.get('note', '')} (P(unsafe) "
            f"{p[i]:.3f}{', in distribution' if within[i] else ''})"
            for i, r in enumerate(have)
            if allowed[i]
        ]
        ev: dict[str, float] | None = None
        if (probes.relevance is not None or probes.items is not None) and any(feats["gold"]):
            cited, gold = [], []
            for i in np.flatnonzero((y == 1) & np.array([bool(g) for g in feats["gold"]])):
                cited.append(probe_cites(probes, pack, feats, rows, int(i), args.max_cited))
                gold.append(feats["gold"][i])
            ev = evidence_prf(cited, gold)
        acc = float((flagged == (y == 1)).mean())
        rec = float(flagged[y == 1].mean()) if y.any() else float("nan")
        figures[set_label(name)] = {
            "records": len(y),
            "unsafe": int(y.sum()),
            "accuracy": acc,
            "recall": rec,
            "auc": _auc(y, p),
            "in_distribution": float(within.mean()),
            "unsafe_allowed": int(allowed.sum()),
            "unsafe_allowed_guarded": int(guarded.sum()),
            "evidence": ev,
        }
        print(
            f"{set_label(name):<28}{len(y):>4}{int(y.sum()):>7}{100 * acc:>7.1f}"
            f"{100 * rec:>7.1f}{_auc(y, p):>7.3f}{int(within.sum()):>8}{int(allowed.sum()):>16}"
            f"{int(guarded.sum()):>9}" + (f"{100 * ev['f1']:>12.1f}%" if ev else f"{'-':>13}")
        )
    if slips:
        print(
            "unsafe requests the probe would allow (the guard sends those outside to generation):"
        )
        print("\n".join(slips))
    return figures


def plot_layers(name: str, dec: list[dict[str, Any]], rel: list[dict[str, Any]], out: Path) -> None:
    import matplotlib

    matplotlib.use("Agg")
    import matplotlib.pyplot as plt

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


def main() -> None:
    parser = argparse.ArgumentParser(
        description=__doc__, formatter_class=argparse.RawTextHelpFormatter
    )
    parser.add_argument(
        "command",
        choices=["extract", "train", "report", "guard", "guard-report", "ids", "sanity"],
    )
    parser.add_argument("--tier", default="edge")
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument("--part", choices=["tuning", "report", "all"], default="all")
    parser.add_argument(
        "--set",
        action="append",
        default=[],
        help="extract: a hand-written set instead of ASSEBench (benchmarks/action_sets.py: "
        "sanity-first, sanity-fresh, a stem under benchmarks/data/ or a path); repeatable",
    )
    parser.add_argument(
        "--extra",
        action="append",
        default=[],
        help="train: a hand-written set trained on beside ASSEBench's tuning part; repeatable",
    )
    parser.add_argument(
        "--heldout",
        action="append",
        default=[],
        help="report: a hand-written set scored from its cached features; repeatable",
    )
    parser.add_argument("--limit", type=int, default=0, help="extract at most this many records")
    parser.add_argument(
        "--max-seconds", type=float, default=0, help="extract: stop after this long (0: never)"
    )
    parser.add_argument("--recall", type=float, default=0.95, help="target unsafe recall")
    parser.add_argument("--max-cited", type=int, default=4)
    parser.add_argument(
        "--cv",
        choices=["profiles", "records"],
        default="profiles",
        help="train: decision folds hold out whole agent profiles (default) or random records",
    )
    parser.add_argument("--layer-stride", type=int, default=1, help="train every Nth layer")
    parser.add_argument(
        "--decision-read",
        choices=["last", "action_mean"],
        default="last",
        help="train: the decision probe reads the prompt's last token or the mean over the "
        "action's tokens (cached by `benchmarks.probe_reads extract`)",
    )
    parser.add_argument(
        "--guard-components",
        type=lambda v: [int(k) for k in v.split(",")],
        default=[32, 64],
        help="guard: principal components, comma-separated; the first is kept, the others "
        "are printed for comparison",
    )
    parser.add_argument(
        "--guard-quantile",
        type=float,
        default=0.99,
        help="guard: thresholds at this quantile of out-of-fold distances",
    )
    parser.add_argument(
        "--generation",
        type=Path,
        help="guard-report: results.json of `benchmarks.quality --paths generation --ids` on "
        "the same records, for the decisions where the probe abstains",
    )
    parser.add_argument("--probe", type=Path, help="sanity: the probe file (default: the tier's)")
    parser.add_argument(
        "--actions",
        default="first",
        help="sanity: the first hand-written set (25), the fresh one (16) "
        "(benchmarks/sanity_actions.py), or a set of benchmarks/action_sets.py",
    )
    parser.add_argument("--budget-ms", type=int, default=600_000, help="sanity: latency budget")
    parser.add_argument(
        "--out", type=Path, help="sanity: output folder (default: bench-results/probes)"
    )
    args = parser.parse_args()
    if args.command == "sanity":
        asyncio.run(probe_sanity.sanity(args))
        return
    commands = {"extract": extract, "train": train, "report": report}
    commands |= {"guard": probe_guard.guard, "guard-report": probe_guard.guard_report}
    commands |= {"ids": probe_guard.ids}
    commands[args.command](args)


if __name__ == "__main__":
    main()
