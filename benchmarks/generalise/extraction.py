"""`extract`: the edge model's prefill on every record, its hidden states cached on disk, in an
order that leaves a balanced sample of each source wherever a bounded run stops."""

from __future__ import annotations

import argparse
import hashlib
import time
from collections import defaultdict

import numpy as np

from benchmarks.generalise.data import LAYERS, feature_dir, record_key
from benchmarks.probes.features import probe_prompt, reading_backend, tier_model
from benchmarks.records import Record
from benchmarks.sources import HELD_OUT_SETS, TRAINING_SOURCES, Source, load_source
from service.decision.prompt import ACTION_SPAN, PROFILE_HEADER, ROLL_CALL_HEADER
from service.evidence import DEFAULT_PACK, PolicyLibrary
from service.settings import load_settings

ORDER_SEED = "gatekeeper-generalise-1"


def extraction_order(sources: list[Source]) -> list[tuple[str, Record]]:
    """Round-robin over the sources; inside one, labels alternate and each task gives one
    record before any gives its second, in a seeded-hash order."""

    def key(text: str) -> bytes:
        return hashlib.sha256(f"{ORDER_SEED}:{text}".encode()).digest()

    queues = []
    for source in sources:
        by_label: dict[bool, list[Record]] = {True: [], False: []}
        seen: dict[tuple[str, bool], int] = defaultdict(int)
        ranked = []
        for record, group in sorted(
            zip(source.records, source.groups, strict=True), key=lambda rg: key(rg[0].id)
        ):
            ranked.append((seen[group, record.unsafe], key(group), record))
            seen[group, record.unsafe] += 1
        for _, _, record in sorted(ranked, key=lambda t: (t[0], t[1])):
            by_label[record.unsafe].append(record)
        mixed = [r for pair in zip(by_label[True], by_label[False], strict=False) for r in pair]
        rest = by_label[True][len(mixed) // 2 :] + by_label[False][len(mixed) // 2 :]
        queues.append([(source.name, r) for r in mixed + rest])
    order = []
    for k in range(max(map(len, queues), default=0)):
        order += [q[k] for q in queues if k < len(q)]
    return order


def extract(args: argparse.Namespace) -> None:
    settings = load_settings()
    name, _, sha = tier_model(settings, args.tier)
    out = feature_dir(sha)
    sources = [load_source(s) for s in (*TRAINING_SOURCES, *HELD_OUT_SETS)]
    todo = [
        (src, r)
        for src, r in extraction_order(sources)
        if not (out / src / f"{record_key(r.id)}.npz").exists()
    ]
    print(f"{name} ({sha[:12]}): {len(todo)} records to extract into {out}", flush=True)
    evidence = list(PolicyLibrary().get(DEFAULT_PACK).items)
    backend = reading_backend(args.tier)
    started = time.monotonic()
    done = 0
    try:
        for src, record in todo:
            if args.max_seconds and time.monotonic() - started > args.max_seconds:
                break
            built = probe_prompt(record.request, backend, settings, args.tier, evidence)
            states = backend.hidden_states(
                built.prompt,
                layers=LAYERS,
                span=ACTION_SPAN,
                until=ROLL_CALL_HEADER,
                shallow_after=PROFILE_HEADER,
            )
            (out / src).mkdir(parents=True, exist_ok=True)
            np.savez(
                out / src / f"{record_key(record.id)}.npz",
                mean=states.span_mean.astype(np.float16),
                last=states.last.astype(np.float16),
                prompt_tokens=states.prompt_tokens,
                cached_tokens=states.cached_tokens,
                prefill_s=states.prefill_s,
            )
            done += 1
            if done % 25 == 0:
                took = time.monotonic() - started
                print(f"  {done}/{len(todo)} in {took:.0f} s", flush=True)
    finally:
        backend.close()
    print(f"extracted {done} records in {time.monotonic() - started:.0f} s")
