"""Scoring a written probe from cached features (`benchmarks.probes report`): the reporting
part beside the decision the generation path reads from the same prefill's logits, and with
`--heldout`, hand-written sets, alone and behind the guard."""

from __future__ import annotations

import argparse
import json
from collections import Counter
from typing import Any

import numpy as np

from benchmarks.action_sets import named_set, set_label
from benchmarks.probes.features import ROOT, decision_rows, load_features, tier_model
from benchmarks.probes.fit import ece, evidence_prf, roc_auc
from benchmarks.probes.guard import inside
from benchmarks.quality import gold_ids
from benchmarks.records import Record, load_records, split
from service.decision.probes import ProbeSet, cite
from service.evidence import DEFAULT_PACK, PolicyLibrary, PolicyPack
from service.settings import load_settings


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


def probe_evidence(
    probes: ProbeSet, pack: PolicyPack, feats: dict[str, Any], rows: Any, max_cited: int
) -> tuple[dict[str, float], list[set[str]]]:
    """The probe's evidence precision, recall and F1 on the unsafe records with gold rules,
    and those records' gold rules."""
    y = feats["y"]
    cited, gold = [], []
    for i in np.flatnonzero((y == 1) & np.array([bool(g) for g in feats["gold"]])):
        cited.append(probe_cites(probes, pack, feats, rows, int(i), max_cited))
        gold.append(feats["gold"][i])
    return evidence_prf(cited, gold), gold


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
    figures = _decision_figures(rows, y)
    if probes.relevance is not None or probes.items is not None:
        figures |= _evidence_figures(probes, pack, feats, args)
    print(
        f"prefill p50 {np.median(feats['prefill_s']):.2f} s per record (probe path, uncached part)"
    )
    if args.heldout:
        figures["heldout"] = report_heldout(probes, sha, pack, args)
    out = ROOT / "bench-results" / "probes"
    out.mkdir(parents=True, exist_ok=True)
    (out / f"report-{args.tier}.json").write_text(json.dumps(figures, indent=1))


def _decision_figures(rows: dict[str, tuple[Any, Any]], y: Any) -> dict[str, Any]:
    """Accuracy, recall, precision, AUC and ECE of each decision read; printed as a table."""
    print(f"\n{'decision read':<30}{'acc%':>7}{'rec%':>7}{'prec%':>7}{'AUC':>7}{'ECE':>7}")
    figures: dict[str, Any] = {}
    for label, (p, flagged) in rows.items():
        acc = float((flagged == (y == 1)).mean())
        rec = float(flagged[y == 1].mean())
        prec = float(y[flagged].mean()) if flagged.any() else 0.0
        figures[label] = {"accuracy": acc, "recall": rec, "precision": prec, "auc": roc_auc(y, p)}
        figures[label]["ece"] = ece(p, y)
        print(
            f"{label:<30}{100 * acc:>7.1f}{100 * rec:>7.1f}{100 * prec:>7.1f}"
            f"{roc_auc(y, p):>7.3f}{ece(p, y):>7.3f}"
        )
    return figures


def _evidence_figures(
    probes: ProbeSet, pack: PolicyPack, feats: dict[str, Any], args: argparse.Namespace
) -> dict[str, Any]:
    """The probe's evidence on the reporting part, beside a prior that knows only the data set."""
    rows_all = decision_rows(feats, probes.decision_read)
    ev, gold = probe_evidence(probes, pack, feats, rows_all, args.max_cited)
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
    print(
        f"evidence, the two most frequent gold rules every time ({', '.join(sorted(prior))}): "
        f"precision {100 * base['precision']:.1f} %, recall {100 * base['recall']:.1f} %, "
        f"F1 {100 * base['f1']:.1f} %"
    )
    return {"evidence": ev, "evidence_prior": base}


def report_heldout(
    probes: ProbeSet, sha: str, pack: PolicyPack, args: argparse.Namespace
) -> dict[str, Any]:
    """The probe, alone and behind its guard, on hand-written sets' cached features: how many
    unsafe requests it would allow (named), accuracy, AUC, and evidence where there is gold."""
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
        figures[set_label(name)], mine = _heldout_set(probes, pack, name, have, feats, args)
        slips += mine
    if slips:
        print(
            "unsafe requests the probe would allow (the guard sends those outside to generation):"
        )
        print("\n".join(slips))
    return figures


def _heldout_set(
    probes: ProbeSet,
    pack: PolicyPack,
    name: str,
    have: list[Record],
    feats: dict[str, Any],
    args: argparse.Namespace,
) -> tuple[dict[str, Any], list[str]]:
    """One hand-written set's figures, printed as a row, and its unsafe requests allowed."""
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
    slips = [
        f"  {set_label(name)} {r.id}: {r.raw.get('note', '')} (P(unsafe) "
        f"{p[i]:.3f}{', in distribution' if within[i] else ''})"
        for i, r in enumerate(have)
        if allowed[i]
    ]
    ev: dict[str, float] | None = None
    if (probes.relevance is not None or probes.items is not None) and any(feats["gold"]):
        ev, _ = probe_evidence(probes, pack, feats, rows, args.max_cited)
    acc = float((flagged == (y == 1)).mean())
    rec = float(flagged[y == 1].mean()) if y.any() else float("nan")
    figures = {
        "records": len(y),
        "unsafe": int(y.sum()),
        "accuracy": acc,
        "recall": rec,
        "auc": roc_auc(y, p),
        "in_distribution": float(within.mean()),
        "unsafe_allowed": int(allowed.sum()),
        "unsafe_allowed_guarded": int(guarded.sum()),
        "evidence": ev,
    }
    print(
        f"{set_label(name):<28}{len(y):>4}{int(y.sum()):>7}{100 * acc:>7.1f}"
        f"{100 * rec:>7.1f}{roc_auc(y, p):>7.3f}{int(within.sum()):>8}{int(allowed.sum()):>16}"
        f"{int(guarded.sum()):>9}" + (f"{100 * ev['f1']:>12.1f}%" if ev else f"{'-':>13}")
    )
    return figures, slips
