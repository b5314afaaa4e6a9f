"""The cross-source protocol (benchmarks/generalise/) on synthetic data: thresholds come from
the training sources alone, a reader that only learnt one source's wording fails on another,
and the extraction order is balanced whatever point it stops at."""

from __future__ import annotations

import numpy as np

from benchmarks import generalise as gen
from benchmarks.records import Record, to_request
from benchmarks.sources import Source


def _record(rid: str, unsafe: bool, action: str) -> Record:
    raw = {
        "id": rid,
        "label": int(unsafe),
        "contents": [
            [{"role": "user", "content": "do the task"}, {"role": "agent", "action": action}]
        ],
    }
    return Record(rid, unsafe, to_request(raw), raw)


def _data(n: int, signal: dict[str, float], seed: int = 0) -> gen.Data:
    """Three sources; one feature dimension carries the label with the source's strength, a
    second carries it in the first source only (its wording), the rest is noise."""
    rng = np.random.default_rng(seed)
    records, source, groups, rows = [], [], [], []
    for name, strength in signal.items():
        for i in range(n):
            unsafe = i % 2 == 0
            records.append(_record(f"{name}-{i}", unsafe, f"act {i}"))
            source.append(name)
            groups.append(f"{name}:{i // 2}")
            x = rng.normal(size=8)
            x[0] += strength * (1 if unsafe else -1)
            if name == "openagentsafety":
                x[1] += 3.0 * (1 if unsafe else -1)
            rows.append(x)
    y = np.array([int(r.unsafe) for r in records])
    data = gen.Data(records, np.array(source), np.array(groups), y, ["t"] * len(y))
    data.vectors["v"] = np.array(rows)
    return data


def test_thresholds_keep_the_recall_of_every_source() -> None:
    rng = np.random.default_rng(1)
    y = np.array([1, 0] * 100)
    source = np.array(["a"] * 100 + ["b"] * 100)
    p = np.clip(0.5 + 0.3 * (2 * y - 1) + rng.normal(0, 0.15, 200), 0, 1)
    p[source == "b"] -= 0.2  # b's unsafe records score lower: the cut-off must follow them
    t = gen.choose_thresholds(p, y, source, recall=0.95)
    for s in ("a", "b"):
        m = (source == s) & (y == 1)
        assert (p[m] > t.allow_below).mean() >= 0.95
    assert t.deny_above >= t.allow_below
    d = gen.decisions(p, t)
    assert set(d) <= {"allow", "deny", "escalate"}
    assert (d[p <= t.allow_below] == "allow").all()


def test_leave_one_source_out_scores_every_source_from_the_others() -> None:
    data = _data(120, {"openagentsafety": 2.0, "toolemu": 2.0, "handwritten": 2.0})
    folds = gen.leave_one_source_out(gen.vector_reader("v", 1.0), data, recall=0.95)
    assert [f.held_out for f in folds] == ["openagentsafety", "toolemu", "handwritten"]
    for f in folds:
        assert len(f.y) == 120
        assert f.scores["auc"] > 0.8  # the shared signal transfers
    m = gen.macro(folds)
    assert m["min_recall"] <= m["recall"]


def test_a_reader_of_one_sources_wording_does_not_transfer() -> None:
    # only the first source carries any label signal, in its own feature: held out, the
    # other two sources score near chance, which the per-source table shows
    data = _data(120, {"openagentsafety": 0.0, "toolemu": 0.0, "handwritten": 0.0})
    folds = {
        f.held_out: f for f in gen.leave_one_source_out(gen.vector_reader("v", 1.0), data, 0.95)
    }
    assert abs(folds["toolemu"].scores["auc"] - 0.5) < 0.15
    assert abs(folds["handwritten"].scores["auc"] - 0.5) < 0.15
    # inside its own source the reader does learn it: the sources disagree, it is not blind
    within = gen.within_source_auc(gen.vector_reader("v", 1.0), data)
    assert within["openagentsafety"] > 0.9
    assert abs(within["toolemu"] - 0.5) < 0.15


def test_weights_make_each_source_and_label_count_the_same() -> None:
    data = _data(10, {"openagentsafety": 1.0, "toolemu": 1.0})
    data = data.subset(np.r_[np.ones(20, bool)][: len(data.y)] & (np.arange(len(data.y)) != 0))
    w = gen.weights(data)
    for s in ("openagentsafety", "toolemu"):
        for label in (0, 1):
            m = (data.source == s) & (data.y == label)
            assert np.isclose(w[m].sum(), w.sum() / 4)


def test_extraction_order_is_balanced_at_any_stop() -> None:
    a = [_record(f"a{i}", i % 3 == 0, "x") for i in range(30)]  # a third unsafe
    b = [_record(f"b{i}", i % 2 == 0, "x") for i in range(10)]
    sources = [
        Source("a", a, [f"task{i // 5}" for i in range(30)]),
        Source("b", b, [f"t{i}" for i in range(10)]),
    ]
    order = gen.extraction_order(sources)
    assert sorted(r.id for _, r in order) == sorted(r.id for r in a + b)
    head = order[:12]
    assert {s for s, _ in head} == {"a", "b"}
    for s in ("a", "b"):
        labels = [r.unsafe for src, r in head if src == s]
        assert abs(sum(labels) - len(labels) / 2) <= 1
    # inside a label, one record per task before any task's second: source a's first six
    # tasks each give one of its first six safe records
    safe_a = [r.id for src, r in order if src == "a" and not r.unsafe][:6]
    assert len({int(rid[1:]) // 5 for rid in safe_a}) == 6


def test_record_keys_are_file_names() -> None:
    key = gen.record_key("toolemu-official_4-model/with:odd chars" * 3)
    assert len(key) == 24 and key.isalnum()
