"""Which hidden state reads the decision on hand-written requests? A study, not a serving path.

    .venv/bin/python -m benchmarks.probes.reads extract --tier edge --set probe-actions-train-a \\
        --set probe-actions-train-b --set sanity-first --set sanity-fresh
    .venv/bin/python -m benchmarks.probes.reads compare --tier edge

This compares, on the hand-written minimal pairs (benchmarks/action_sets.py), four reads of
the same prompt: the last token and the mean of the roll-call lines (from `benchmarks.probes
extract`'s cache), and the state at the end of the action and the mean over the action's
tokens (cached beside the other under `...-span`, by this script's `extract` or, for records
extracted since, by `benchmarks.probes extract` in the same prefill). For each read and layer:
a logistic regression, 5-fold out of fold with folds by scenario (twins together), and the
AUC on other sets (the sanity actions) of one fitted on all the pairs. The model's own read
(P(allow) at the decision, from the same prefill) is printed for comparison."""

from __future__ import annotations

import argparse
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.action_sets import named_set
from benchmarks.probes.features import (
    feature_dir,
    load_features,
    probe_prompt,
    reading_backend,
    save_span,
    span_dir,
    tier_model,
)
from benchmarks.probes.fit import C_GRID, fit_logistic, out_of_fold, profile_groups, roc_auc
from benchmarks.quality import DEFAULT_DATA
from benchmarks.records import Record, load_records
from service.decision.prompt import ACTION_SPAN, ROLL_CALL_HEADER
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.settings import load_settings

TRAIN = ("probe-actions-train-a", "probe-actions-train-b")
OTHER = ("sanity-first", "sanity-fresh")


def extract(args: argparse.Namespace) -> None:
    settings = load_settings()
    name, _, sha = tier_model(settings, args.tier)
    out = span_dir(sha)
    out.mkdir(parents=True, exist_ok=True)
    records = [r for s in args.set or [*TRAIN, *OTHER] for r in named_set(s)]
    if args.assebench:  # the ASSEBench records `benchmarks.probes extract` has cached
        records += [
            r for r in load_records(args.data) if (feature_dir(sha) / f"{r.id}.npz").exists()
        ]
    todo = [r for r in records if not (out / f"{r.id}.npz").exists()]
    print(f"{name}: {len(todo)} of {len(records)} records to extract into {out}")
    backend = reading_backend(args.tier)
    layers = tuple(range(backend.n_layers - 1))
    evidence = list(PolicyLibrary().get(DEFAULT_PACK).items)
    started = time.monotonic()
    try:
        for record in tqdm(todo, unit="rec"):
            built = probe_prompt(record.request, backend, settings, args.tier, evidence)
            states = backend.hidden_states(
                built.prompt, layers=layers, marks=(ROLL_CALL_HEADER,), span=ACTION_SPAN
            )
            save_span(out / f"{record.id}.npz", states)
    finally:
        backend.close()
    print(f"extracted {len(todo)} records in {time.monotonic() - started:.0f} s")


def _reads(sha: str, records: list[Record]) -> tuple[list[Record], dict[str, Any], Any, Any]:
    """The records with every read cached, their reads (name -> (n, layers, d)), labels and
    the model's own P(allow)."""
    pack = PolicyLibrary().get(DEFAULT_PACK)
    have, feats = load_features(sha, records, pack)
    keep = [i for i, r in enumerate(have) if (span_dir(sha) / f"{r.id}.npz").exists()]
    with_spans = bool(keep)
    keep = keep or list(range(len(have)))  # no span cache: the other two reads only
    reads: dict[str, Any] = {
        "last token": feats["last"][keep],
        "roll-call mean": np.stack([feats["marks"][i].mean(axis=1) for i in keep]),
    }
    if with_spans:
        spans = [np.load(span_dir(sha) / f"{have[i].id}.npz") for i in keep]
        reads["end of action"] = np.stack([z["end"].astype(np.float32) for z in spans])
        reads["action mean"] = np.stack([z["mean"].astype(np.float32) for z in spans])
    return [have[i] for i in keep], reads, feats["y"][keep], feats["p_allow"][keep]


def compare(args: argparse.Namespace) -> None:
    name, _, sha = tier_model(load_settings(), args.tier)
    train, reads, y, p_allow = _reads(sha, [r for s in TRAIN for r in named_set(s)])
    other, other_reads, y_other, p_other = _reads(sha, [r for s in OTHER for r in named_set(s)])
    if len(train) < 40:
        raise SystemExit("too few records with both caches: run both extracts first")
    groups = profile_groups(train)
    print(
        f"{name}: {len(train)} hand-written training requests ({y.sum()} unsafe, "
        f"{len(set(groups))} scenarios), {len(other)} other ({y_other.sum()} unsafe)\n"
        f"the model's own read, P(allow) at the decision: AUC {roc_auc(y, 1 - p_allow):.3f} on "
        f"the pairs, {roc_auc(y_other, 1 - p_other):.3f} on the others\n"
    )
    n_layers = reads["last token"].shape[1]
    layers = args.layers or list(range(0, n_layers, 3))
    print(f"{'read':<16}{'layer':>6}{'C':>7}{'pairs, out of fold':>20}{'others':>8}")
    for read, x_all in reads.items():
        for layer in layers:
            x = x_all[:, layer, :]
            scores = {c: out_of_fold(x, y, c, groups) for c in C_GRID}
            c = max(scores, key=lambda k: roc_auc(y, scores[k]))
            _, _, logit = fit_logistic(x, y, c)
            other_auc = roc_auc(y_other, logit(other_reads[read][:, layer, :]))
            print(f"{read:<16}{layer:>6}{c:>7g}{roc_auc(y, scores[c]):>20.3f}{other_auc:>8.3f}")


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes.reads",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
    )
    parser.add_argument("command", choices=["extract", "compare"])
    parser.add_argument("--tier", default="edge")
    parser.add_argument("--set", action="append", default=[], help="extract: a set (repeatable)")
    parser.add_argument(
        "--assebench",
        action="store_true",
        help="extract: also every ASSEBench record in `benchmarks.probes extract`'s cache",
    )
    parser.add_argument("--data", type=Path, default=DEFAULT_DATA)
    parser.add_argument(
        "--layers",
        type=lambda v: [int(k) for k in v.split(",")],
        help="compare: layers, comma-separated (default: every third)",
    )
    args = parser.parse_args()
    {"extract": extract, "compare": compare}[args.command](args)


if __name__ == "__main__":
    main()
