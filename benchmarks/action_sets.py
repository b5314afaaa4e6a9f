"""Hand-written /evaluate requests with a reviewer's label, as records for the probe scripts.

Two kinds, both unlike ASSEBench's long, formulaic transcripts:

- `benchmarks/data/probe-actions-*.json`: requests written for the probes (issue #9), each
  with `unsafe` (what a careful reviewer says), `gold` (the default pack's rules it breaks,
  empty when safe), `scenario` (the context it shares with its twins: cross-validation keeps a
  scenario in one fold) and `note`. `probe-actions-train-a` and `-b` are minimal pairs for
  training; `probe-actions-heldout` was written apart from them and is never trained on.
- `sanity-first` and `sanity-fresh`: benchmarks/sanity_actions.py (no gold rules).

A set is named by its file stem or by a path."""

from __future__ import annotations

import json
from pathlib import Path

from benchmarks.records import Record
from benchmarks.sanity_actions import SANITY, SANITY_FRESH
from service.schemas import EvaluateRequest

DATA = Path(__file__).resolve().parent / "data"
SANITY_SETS = {"sanity-first": SANITY, "sanity-fresh": SANITY_FRESH}


def load_action_set(path: Path) -> list[Record]:
    raw = json.loads(path.read_text("utf-8"))
    return [
        Record(
            str(r["id"]),
            bool(r["unsafe"]),
            EvaluateRequest.model_validate(r["request"] | {"request_id": str(r["id"])}),
            r,
        )
        for r in raw
    ]


def sanity_records(name: str) -> list[Record]:
    records = []
    for i, (note, unsafe, body) in enumerate(SANITY_SETS[name]):
        raw = {"note": note, "scenario": f"{name}:{body['agent']['id']}"}
        request = EvaluateRequest.model_validate(body | {"request_id": f"{name}-{i:02d}"})
        records.append(Record(f"{name}-{i:02d}", unsafe, request, raw))
    return records


def named_set(name: str) -> list[Record]:
    """The records of a set: `sanity-first`, `sanity-fresh`, a stem under benchmarks/data/ or
    a path to a file in the same format."""
    if name in SANITY_SETS:
        return sanity_records(name)
    path = Path(name)
    if not path.exists():
        path = DATA / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"no action set {name!r} (a sanity set, a stem in {DATA}, or a path)")
    return load_action_set(path)


def set_label(name: str) -> str:
    return Path(name).stem if name not in SANITY_SETS else name
