"""The records of the sources as arrays, with the edge model's cached features where extracted,
and the weights that make each source, and each label inside it, count the same."""

from __future__ import annotations

import hashlib
from dataclasses import dataclass, field
from pathlib import Path
from typing import Any

import numpy as np

from benchmarks.probes.features import FEATURES
from benchmarks.records import Record
from benchmarks.sources import judge_text, load_source
from service.decision.probes import PROBE_PROMPT_VERSION

LAYERS = tuple(range(18))  # blocks read; the request's tokens go no deeper than the last


def feature_dir(sha: str) -> Path:
    return FEATURES / f"{sha[:16]}-{PROBE_PROMPT_VERSION}-xs"


def record_key(record_id: str) -> str:
    return hashlib.sha256(record_id.encode()).hexdigest()[:24]


@dataclass
class Data:
    """Every record of the sources, with its source, group, label and cached features."""

    records: list[Record]
    source: np.ndarray  # source name per record
    groups: np.ndarray
    y: np.ndarray
    texts: list[str]
    edge: dict[str, np.ndarray] = field(default_factory=dict)  # read -> (n, layers, d), NaN rows
    edge_ms: np.ndarray | None = None  # the shallow prefill's time per record
    vectors: dict[str, np.ndarray] = field(default_factory=dict)  # reader -> (n, d)

    def subset(self, keep: np.ndarray) -> Data:
        idx = np.flatnonzero(keep)
        return Data(
            [self.records[i] for i in idx],
            self.source[idx],
            self.groups[idx],
            self.y[idx],
            [self.texts[i] for i in idx],
            {k: v[idx] for k, v in self.edge.items()},
            None if self.edge_ms is None else self.edge_ms[idx],
            {k: v[idx] for k, v in self.vectors.items()},
        )


def load_data(names: tuple[str, ...], sha: str | None) -> Data:
    records, source, groups = [], [], []
    for name in names:
        src = load_source(name)
        records += src.records
        source += [name] * len(src.records)
        groups += [f"{name}:{g}" for g in src.groups]
    data = Data(
        records,
        np.array(source),
        np.array(groups),
        np.array([int(r.unsafe) for r in records]),
        [judge_text(r.request) for r in records],
    )
    if sha is not None:
        base = feature_dir(sha)
        rows: dict[str, list[Any]] = {"mean": [], "last": []}
        ms = []
        shape = None
        for name, r in zip(source, records, strict=True):
            f = base / name / f"{record_key(r.id)}.npz"
            if f.exists():
                with np.load(f) as z:
                    for k in rows:
                        rows[k].append(z[k].astype(np.float32))
                    shape = z["mean"].shape
                    ms.append(1000 * float(z["prefill_s"]))
            else:
                for k in rows:
                    rows[k].append(None)
                ms.append(np.nan)
        if shape is not None:
            for k, v in rows.items():
                data.edge[k] = np.stack([x if x is not None else np.full(shape, np.nan) for x in v])
        data.edge_ms = np.array(ms)
    return data


def weights(data: Data) -> np.ndarray:
    """Each source, and each label inside it, weighs the same."""
    w = np.zeros(len(data.y))
    for s in np.unique(data.source):
        for label in (0, 1):
            m = (data.source == s) & (data.y == label)
            if m.any():
                w[m] = 1.0 / m.sum()
    weighed: np.ndarray = w * len(w) / w.sum()
    return weighed
