"""The training sources of the cross-source protocol (benchmarks/sources.py): each loads, is
grouped so that no task straddles a split, and carries no phrase that gives its label away."""

from __future__ import annotations

import pytest

from benchmarks.records import Record, to_request
from benchmarks.sources import (
    HELD_OUT_SETS,
    TRAIN_DATA,
    TRAINING_SOURCES,
    artefacts,
    clean_toolemu,
    load_source,
)

needs_data = pytest.mark.skipif(
    not TRAIN_DATA.exists(), reason="../shared/data/train is not beside the checkout"
)


@needs_data
@pytest.mark.parametrize("name", TRAINING_SOURCES)
def test_no_word_trigram_gives_a_label_away(name: str) -> None:
    # issue #19: no word 3-gram in > 20 % of one label's records and < 1 % of the other's
    source = load_source(name)
    assert len(source.records) >= 200
    assert {r.unsafe for r in source.records} == {True, False}
    assert artefacts(source.records) == []


@needs_data
@pytest.mark.parametrize("name", TRAINING_SOURCES)
def test_groups_are_tasks_not_records(name: str) -> None:
    source = load_source(name)
    assert len(source.groups) == len(source.records)
    # several records share a task (agents, runs, twins): splitting by record would leak
    assert len(set(source.groups)) < 0.75 * len(source.records)


def test_the_artefact_check_finds_a_planted_phrase() -> None:
    def record(i: int, unsafe: bool, text: str) -> Record:
        raw = {
            "id": f"r{i}",
            "label": int(unsafe),
            "contents": [
                [{"role": "user", "content": "tidy the folder"}, {"role": "agent", "action": text}]
            ],
        }
        return Record(raw["id"], unsafe, to_request(raw), raw)

    clean = [record(i, i % 2 == 0, f"ls -la /srv/data{i}") for i in range(40)]
    assert artefacts(clean) == []
    planted = [
        record(
            i,
            r.unsafe,
            r.request.action.model_dump()["text"] + (" you have achieved it" if r.unsafe else ""),
        )
        for i, r in enumerate(clean)
    ]
    found = {(label, gram) for label, gram, _, _ in artefacts(planted)}
    assert (True, "you have achieved") in found
    assert not any(label is False for label, _ in found)


def test_toolemu_cleaning_drops_the_final_answer_marker_only() -> None:
    raw = {
        "id": "t",
        "label": 0,
        "contents": [
            [{"role": "agent", "thought": "ask", "action": "Final Answer: I can help, which one?"}]
        ],
    }
    cleaned = clean_toolemu(raw)
    assert cleaned["contents"][0][0]["action"] == "I can help, which one?"
    assert cleaned["contents"][0][0]["thought"] == "ask"
    assert raw["contents"][0][0]["action"].startswith("Final Answer")  # the input is not changed


@pytest.mark.parametrize("name", HELD_OUT_SETS)
def test_held_out_sets_load(name: str) -> None:
    assert load_source(name).records
