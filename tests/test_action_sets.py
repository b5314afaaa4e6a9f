"""The hand-written request sets for the probes (benchmarks/action_sets.py): every request is a
valid /evaluate body, labels and gold rules agree, training twins share a scenario, and the
held-out set shares nothing with the training sets."""

from __future__ import annotations

import argparse
import json
from collections import Counter, defaultdict
from pathlib import Path

import numpy as np
import pytest

from benchmarks.action_sets import DATA, named_set
from benchmarks.probes import features, report
from benchmarks.probes.fit import profile_groups
from benchmarks.quality import gold_ids
from service.evidence import DEFAULT_PACK, PolicyLibrary

# every probe-actions-train-* file: a and b (2026-11-30), c to h (issue #19, each written by a
# separate session from one brief, none of which saw the evaluation code or any score)
TRAIN = tuple(sorted(p.stem for p in DATA.glob("probe-actions-train-*.json")))
HELDOUT = "probe-actions-heldout"


@pytest.mark.parametrize("name", [*TRAIN, HELDOUT])
def test_every_set_is_valid_and_its_gold_names_pack_rules(name: str) -> None:
    pack_ids = {item.id for item in PolicyLibrary().get(DEFAULT_PACK).items}
    records = named_set(name)
    assert len(records) >= 60
    assert len({r.id for r in records}) == len(records)
    for r in records:
        assert r.request.request_id == r.id
        gold = gold_ids(r, PolicyLibrary().get(DEFAULT_PACK))
        assert set(gold) <= pack_ids, r.id
        assert bool(gold) == r.unsafe, f"{r.id}: an unsafe request names its rules, a safe none"
        assert r.raw["note"].strip() and r.raw["scenario"].strip()
    counts = Counter(r.unsafe for r in records)
    assert counts[True] == counts[False]  # balanced


@pytest.mark.parametrize("name", TRAIN)
def test_training_sets_are_minimal_pairs(name: str) -> None:
    by_scenario: dict[str, list[bool]] = defaultdict(list)
    for r in named_set(name):
        by_scenario[r.raw["scenario"]].append(r.unsafe)
    assert all(sorted(v) == [False, True] for v in by_scenario.values())


def test_there_are_eight_training_sets() -> None:
    assert len(TRAIN) == 8
    assert sum(len(named_set(name)) for name in TRAIN) == 1140


def test_held_out_set_shares_nothing_with_training() -> None:
    train = [r for name in TRAIN for r in named_set(name)]
    held = named_set(HELDOUT)
    assert not {r.id for r in train} & {r.id for r in held}
    assert not {r.raw["scenario"] for r in train} & {r.raw["scenario"] for r in held}
    bodies = {r.request.action.model_dump_json() for r in train}
    assert not [r.id for r in held if r.request.action.model_dump_json() in bodies]


def test_cross_validation_keeps_twins_together() -> None:
    records = named_set(TRAIN[0])[:6]
    groups = profile_groups(records)
    scenarios = [r.raw["scenario"] for r in records]
    for i in range(len(records)):
        for j in range(len(records)):
            assert (groups[i] == groups[j]) == (scenarios[i] == scenarios[j])


def test_sanity_sets_and_paths_are_named_sets() -> None:
    first, fresh = named_set("sanity-first"), named_set("sanity-fresh")
    assert (len(first), len(fresh)) == (25, 16)
    assert first[0].id == "sanity-first-00" and first[0].unsafe
    assert len(named_set(str(DATA / f"{HELDOUT}.json"))) == len(named_set(HELDOUT))
    with pytest.raises(SystemExit, match="no action set"):
        named_set("no-such-set")


def test_report_names_the_unsafe_requests_a_probe_would_allow(
    tmp_path: Path, monkeypatch: pytest.MonkeyPatch, capsys: pytest.CaptureFixture[str]
) -> None:
    """`benchmarks.probes report --heldout`: from cached features, the probe's verdicts on a
    hand-written set, the unsafe ones it would allow by name, and its citations."""
    from service.decision.probes import ProbeSet
    from tests.test_probes import SHA, D, probe_file

    cases = [  # (id, unsafe, gold, the probe's score on it)
        ("x-1", True, ["GK-04"], 3.0),
        ("x-2", True, ["GK-03"], -3.0),  # the probe misses this one
        ("x-3", False, [], -3.0),
        ("x-4", False, [], -3.0),
    ]
    body = {"agent": {"id": "a"}, "action": {"tool": "shell", "arguments": {"cmd": "ls"}}}
    data = [
        {"id": i, "scenario": i, "unsafe": u, "gold": g, "note": f"case {i}", "request": body}
        for i, u, g, _ in cases
    ]
    path = tmp_path / "my-set.json"
    path.write_text(json.dumps(data))
    monkeypatch.setattr(features, "FEATURES", tmp_path / "features")
    out = features.feature_dir(SHA)
    out.mkdir(parents=True)
    for i, _, gold, score in cases:
        last = np.zeros((6, D), np.float32)
        last[:, 0] = score
        marks = np.zeros((6, 2, D), np.float32)
        marks[:, :, 1] = [3.0 if item in gold else -3.0 for item in ("GK-03", "GK-04")]
        np.savez(
            out / f"{i}.npz",
            last=last,
            marks=marks,
            ids=np.array(["GK-03", "GK-04"]),
            prompt_tokens=100,
            cached_tokens=0,
            prefill_s=0.1,
            p_allow=0.5,
        )
    probes = ProbeSet.load(probe_file(tmp_path))
    args = argparse.Namespace(heldout=[str(path)], max_cited=4)
    figures = report.report_heldout(probes, SHA, PolicyLibrary().get(DEFAULT_PACK), args)
    mine = figures["my-set"]
    assert (mine["records"], mine["unsafe"], mine["unsafe_allowed"]) == (4, 2, 1)
    assert mine["recall"] == 0.5 and mine["accuracy"] == 0.75
    assert mine["evidence"]["f1"] == 1.0  # each unsafe case cites exactly its gold rule
    printed = capsys.readouterr().out
    assert "x-2: case x-2" in printed and "x-1:" not in printed
