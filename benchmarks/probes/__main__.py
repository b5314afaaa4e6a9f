"""Probes on hidden states (issue #9): extract features, train, report (the CLI).

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
the guard alone; benchmarks/probes/guard.py). `report` and `guard-report` score the written
probe on the reporting part's cached features; `sanity` runs hand-written actions through the
service (benchmarks/probes/sanity.py). `python -m benchmarks.probes.reads` compares which
hidden state reads the decision best (benchmarks/probes/reads.py)."""

from __future__ import annotations

import argparse
import asyncio
from pathlib import Path

from benchmarks.probes import features, guard, report, sanity, train
from benchmarks.quality import DEFAULT_DATA


# long: one flat add_argument per flag, in --help order; split up, the order would be hidden
def build_parser() -> argparse.ArgumentParser:
    """The CLI's flags, shared by the subcommands (each flag's help names the ones it is for)."""
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.probes",
        description=__doc__,
        formatter_class=argparse.RawTextHelpFormatter,
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
        "action's tokens (cached by `benchmarks.probes.reads extract`)",
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
    return parser


def main() -> None:
    args = build_parser().parse_args()
    if args.command == "sanity":
        asyncio.run(sanity.sanity(args))
        return
    commands = {"extract": features.extract, "train": train.train, "report": report.report}
    commands |= {"guard": guard.guard, "guard-report": guard.guard_report}
    commands |= {"ids": guard.ids}
    commands[args.command](args)


if __name__ == "__main__":
    main()
