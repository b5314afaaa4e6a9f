"""The labelled sources the judge is trained and selected on, one `Source` each, for the
cross-source protocol (`benchmarks.generalise`, issue #19).

- `openagentsafety`: 504 OpenHands trajectories over 212 tasks (`../shared/data/train/`),
  grouped by `task_name` (several agent models ran each task);
- `toolemu`: 385 ToolEmu trajectories over 63 cases, grouped by `case_name`, with ToolEmu's
  "Final Answer:" marker stripped (a format marker that split the labels: see `clean_toolemu`);
- `handwritten`: the minimal pairs in `benchmarks/data/probe-actions-train-*.json`, grouped by
  scenario (an unsafe request and its safe twin share one).

ASSEBench-Security is no longer a training source: two strings give its labels away
(`../shared/data/assebench/README.md`). `HELD_OUT_SETS` are hand-written sets that nothing is
trained or selected on. `artefacts` finds word 3-grams that one label carries and the other
almost never does; `tests/test_sources.py` checks that no training source has any."""

from __future__ import annotations

import json
import re
from collections import Counter
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from benchmarks.action_sets import DATA, load_action_set, named_set
from benchmarks.records import Record, load_records
from service.schemas import EvaluateRequest, TextAction

SHARED_DATA = Path(__file__).resolve().parents[2] / "shared" / "data"
TRAIN_DATA = SHARED_DATA / "train"
TRAINING_SOURCES = ("openagentsafety", "toolemu", "handwritten")
# hand-written, never trained or selected on (benchmarks/action_sets.py)
HELD_OUT_SETS = ("probe-actions-heldout", "sanity-first", "sanity-fresh")


@dataclass(frozen=True)
class Source:
    name: str
    records: list[Record]
    groups: list[str]  # one per record: records of a group never straddle a split


_FINAL_ANSWER = re.compile(r"\bFinal Answer\s*:\s*", re.IGNORECASE)
# a closing pleasantry, the whole sentence: "Let me know if you need anything else!"
_COURTESY = re.compile(
    r"[^.!?\n]*\b(?:if you need|let me know if|feel free to)\b[^.!?\n]*[.!?]*", re.IGNORECASE
)


def _clean_toolemu_text(text: str) -> str:
    return _COURTESY.sub("", _FINAL_ANSWER.sub("", text)).strip()


def clean_toolemu(raw: dict[str, Any]) -> dict[str, Any]:
    """Two of ToolEmu's habits split its labels without saying anything about safety, and
    are dropped from every turn, for both labels:
    - its agents end with "Final Answer: ...", and its safe records mostly end by asking the
      user ("Final Answer: I can help, but which ..."): "answer i can" was in 21 % of safe
      records and no unsafe one. The marker is ToolEmu's format, not the agent's words;
    - agents that finished a task close with a pleasantry ("Let me know if you need further
      assistance!"): "if you need" was in 24 % of unsafe records and 1 % of safe ones."""
    episodes = [
        [
            {k: _clean_toolemu_text(v) if isinstance(v, str) else v for k, v in turn.items()}
            for turn in episode
        ]
        for episode in raw["contents"]
    ]
    return raw | {"contents": episodes}


def _shared(name: str) -> Path:
    path = TRAIN_DATA / f"{name}.json"
    if not path.exists():
        raise SystemExit(f"{path} is missing: the training sources live in ../shared/data/train")
    return path


def handwritten_files() -> list[Path]:
    return sorted(DATA.glob("probe-actions-train-*.json"))


def load_source(name: str) -> Source:
    if name == "openagentsafety":
        records = load_records(_shared(name))
        return Source(name, records, [str(r.raw["task_name"]) for r in records])
    if name == "toolemu":
        records = load_records(_shared(name), clean=clean_toolemu)
        return Source(name, records, [str(r.raw["case_name"]) for r in records])
    if name == "handwritten":
        records = [r for path in handwritten_files() for r in load_action_set(path)]
        return Source(name, records, [str(r.raw["scenario"]) for r in records])
    if name in HELD_OUT_SETS:
        records = named_set(name)
        return Source(name, records, [str(r.raw.get("scenario", r.id)) for r in records])
    raise SystemExit(f"unknown source {name!r} (one of {TRAINING_SOURCES + HELD_OUT_SETS})")


def judge_text(request: EvaluateRequest) -> str:
    """The request's own words as the judge reads them: profile, goal, each turn, action."""
    parts = [request.agent.profile or "", request.goal or ""]
    for turn in request.history:
        parts += [turn.content or "", turn.thought or "", turn.action or ""]
    action = request.action
    if isinstance(action, TextAction):
        parts.append(action.text)
    else:
        parts.append(f"{action.tool} {json.dumps(action.arguments, ensure_ascii=False)}")
    return "\n".join(p for p in parts if p)


_WORD = re.compile(r"[a-z0-9']+")


def word_ngrams(text: str, n: int = 3) -> set[tuple[str, ...]]:
    words = _WORD.findall(text.lower())
    return {tuple(words[i : i + n]) for i in range(len(words) - n + 1)}


def artefacts(
    records: list[Record], *, n: int = 3, high: float = 0.20, low: float = 0.01
) -> list[tuple[bool, str, float, float]]:
    """(label, n-gram, share of that label's records, share of the other's) for every word
    n-gram in more than `high` of one label's records and fewer than `low` of the other's:
    a phrase that gives the label away."""
    counts: dict[bool, Counter[tuple[str, ...]]] = {True: Counter(), False: Counter()}
    sizes: Counter[bool] = Counter()
    for r in records:
        sizes[r.unsafe] += 1
        counts[r.unsafe].update(word_ngrams(judge_text(r.request), n))
    found = []
    for label in (True, False):
        if not sizes[label] or not sizes[not label]:
            continue
        for gram, k in counts[label].items():
            share, other = k / sizes[label], counts[not label][gram] / sizes[not label]
            if share > high and other < low:
                found.append((label, " ".join(gram), share, other))
    return sorted(found, key=lambda f: -f[2])
