"""The command line: `python -m benchmarks.generalise {extract,table}`, the package's docstring
as its help."""

from __future__ import annotations

import argparse
from pathlib import Path

import benchmarks.generalise
from benchmarks.generalise.extraction import extract
from benchmarks.generalise.report import table


def main() -> None:
    parser = argparse.ArgumentParser(
        prog="python -m benchmarks.generalise",
        description=benchmarks.generalise.__doc__,
        formatter_class=argparse.RawDescriptionHelpFormatter,
    )
    parser.add_argument("command", choices=["extract", "table"])
    parser.add_argument("--tier", default="edge")
    parser.add_argument("--max-seconds", type=float, default=0)
    parser.add_argument("--recall", type=float, default=0.95)
    parser.add_argument("--only", action="append", help="table: readers whose name has this")
    parser.add_argument(
        "--within", action="store_true", help="table: also AUC inside each source (5 group folds)"
    )
    parser.add_argument("--no-edge", action="store_true", help="table: the text readers alone")
    parser.add_argument("--out", type=Path, default=Path("bench-results/generalise"))
    args = parser.parse_args()
    {"extract": extract, "table": table}[args.command](args)
