"""Feature extraction and the feature cache: the probe prompt of each record, one prefill with
llama.cpp's eval callback, and the hidden states it reads saved under ~/.cache/gatekeeper,
keyed by the model's sha256 and the probe prompt version (`benchmarks.probes extract`)."""

from __future__ import annotations

import argparse
import hashlib
import json
import time
from pathlib import Path
from typing import Any

import numpy as np
from tqdm import tqdm

from benchmarks.action_sets import named_set
from benchmarks.quality import gold_ids
from benchmarks.records import Record, load_records, split
from service.backends.base import HiddenStates
from service.backends.llama_cpp import LlamaCppBackend
from service.decision.grammar import DECISIONS
from service.decision.probes import PROBE_PROMPT_VERSION
from service.decision.prompt import ACTION_SPAN, ROLL_CALL_HEADER, BuiltPrompt, build_prompt
from service.evidence import DEFAULT_PACK, PolicyLibrary, PolicyPack
from service.ops.weights import ModelStore, model_sha256
from service.schemas import EvaluateRequest, EvidenceItem
from service.settings import Settings, load_settings

ROOT = Path(__file__).resolve().parents[2]
FEATURES = Path.home() / ".cache" / "gatekeeper" / "features"
ORDER_SEED = "gatekeeper-probe-order-1"


def balanced_order(records: list[Record]) -> list[Record]:
    """Unsafe and safe records alternately, each label in a seeded-hash order."""

    def key(r: Record) -> bytes:
        return hashlib.sha256(f"{ORDER_SEED}:{r.id}".encode()).digest()

    unsafe = sorted((r for r in records if r.unsafe), key=key)
    safe = sorted((r for r in records if not r.unsafe), key=key)
    out: list[Record] = []
    for i in range(max(len(unsafe), len(safe))):
        out += unsafe[i : i + 1] + safe[i : i + 1]
    return out


def interleave(a: list[Record], b: list[Record], ratio: int) -> list[Record]:
    """`ratio` records of a for each record of b, until both run out."""
    out: list[Record] = []
    ia = ib = 0
    while ia < len(a) or ib < len(b):
        out += a[ia : ia + ratio]
        ia += ratio
        out += b[ib : ib + 1]
        ib += 1
    return out


def tier_model(settings: Settings, tier: str) -> tuple[str, Path, str]:
    limits = settings.tiers[tier]
    name, path = ModelStore(settings).resolve_tier(limits)
    known = limits.model_sha256 or (
        settings.models[limits.model].sha256 if limits.model in settings.models else None
    )
    return name, path, model_sha256(path, known)


def feature_dir(sha: str) -> Path:
    return FEATURES / f"{sha[:16]}-{PROBE_PROMPT_VERSION}"


def reading_backend(tier: str) -> LlamaCppBackend:
    """The tier's model, loaded with hidden-state reading."""
    settings = load_settings()
    limits = settings.tiers[tier]
    name, path, _ = tier_model(settings, tier)
    backend = LlamaCppBackend(
        name, path, n_ctx=limits.n_ctx, n_threads=limits.n_threads, hidden_states=True
    )
    backend.load()
    return backend


def probe_prompt(
    request: EvaluateRequest,
    backend: Any,
    settings: Settings,
    tier: str,
    evidence: list[EvidenceItem],
) -> BuiltPrompt:
    """The probe prompt, as the service builds it on a probe tier: its prompt and a
    roll-call line per evidence item."""
    limits = settings.tiers[tier]
    return build_prompt(
        request,
        evidence,
        count_tokens=backend.count_tokens,
        max_prompt_tokens=limits.n_ctx - limits.max_tokens,
        max_turn_chars=settings.max_turn_chars,
        roll_call=True,
    )


def records_to_extract(args: argparse.Namespace) -> list[Record]:
    """The records `extract` reads, in order: hand-written sets whole, or a part of the data
    set in its balanced order; the first --limit of them."""
    if args.set:  # hand-written sets (benchmarks/action_sets.py), whole
        records = [r for name in args.set for r in named_set(name)]
    else:
        tuning, reporting = split(load_records(args.data))
        parts = {"tuning": tuning, "report": reporting}
        if args.part == "all":
            records = interleave(balanced_order(tuning), balanced_order(reporting), 2)
        else:
            records = balanced_order(parts[args.part])
    if args.limit:
        records = records[: args.limit]
    return records


def extract(args: argparse.Namespace) -> None:
    settings = load_settings()
    name, _, sha = tier_model(settings, args.tier)
    out_dir = feature_dir(sha)
    out_dir.mkdir(parents=True, exist_ok=True)
    (out_dir / "model.json").write_text(
        json.dumps({"model": name, "sha256": sha, "prompt_version": PROBE_PROMPT_VERSION})
    )
    pack = PolicyLibrary().get(DEFAULT_PACK)
    evidence = list(pack.items)
    records = records_to_extract(args)
    todo = [r for r in records if not (out_dir / f"{r.id}.npz").exists()]
    print(f"{name} ({sha[:12]}): {len(records)} records, {len(todo)} to extract into {out_dir}")
    backend = reading_backend(args.tier)
    layers = tuple(range(backend.n_layers - 1))
    spans = span_dir(sha)
    started = time.monotonic()
    tokens = 0
    done = 0
    try:
        for record in tqdm(todo, unit="rec"):
            if args.max_seconds and time.monotonic() - started > args.max_seconds:
                break  # a bounded chunk: run again to go on where this one stopped
            built = probe_prompt(record.request, backend, settings, args.tier, evidence)
            # the same prefill also reads the action (its mean, and the state where it ends)
            # for `benchmarks.probes.reads` and action-mean probes
            states = backend.hidden_states(
                built.prompt,
                layers=layers,
                marks=(ROLL_CALL_HEADER, *built.marks),
                choices=DECISIONS,
                span=ACTION_SPAN,
            )
            tokens += states.prompt_tokens - states.cached_tokens
            done += 1
            spans.mkdir(exist_ok=True)
            save_span(spans / f"{record.id}.npz", states)
            np.savez(
                out_dir / f"{record.id}.npz",
                last=states.last.astype(np.float16),
                marks=states.marks[:, 1:].astype(np.float16),
                ids=np.array([item.id for item in built.evidence]),
                prompt_tokens=states.prompt_tokens,
                cached_tokens=states.cached_tokens,
                prefill_s=states.prefill_s,
                p_allow=states.choice_probs.get("allow", np.nan)
                / max(sum(states.choice_probs.values()), 1e-9),
            )
    finally:
        backend.close()
    took = time.monotonic() - started
    print(f"extracted {done} records in {took:.0f} s ({tokens / max(took, 1e-9):.0f} tok/s)")


def save_span(path: Path, states: HiddenStates) -> None:
    """The action's reads beside the prompt's: the mean over its tokens, the state at its end."""
    np.savez(
        path,
        mean=states.span_mean.astype(np.float16),
        end=states.marks[:, 0].astype(np.float16),
    )


def span_dir(sha: str) -> Path:
    return feature_dir(sha).with_name(feature_dir(sha).name + "-span")


def decision_rows(feats: dict[str, Any], read: str) -> Any:
    """(n, layers, d): what the decision probe reads, the last token or the action's mean."""
    if read == "last":
        return feats["last"]
    if feats["action_mean"] is None:
        raise SystemExit(
            "no cached mean over the action for these records: run "
            "`benchmarks.probes.reads extract` on them first"
        )
    return feats["action_mean"]


def load_features(
    sha: str, records: list[Record], pack: PolicyPack
) -> tuple[list[Record], dict[str, Any]]:
    """The records that have cached features, and their arrays."""
    base = feature_dir(sha)
    have: list[Record] = []
    last, marks, ids, p_allow, prefill = [], [], [], [], []
    for record in records:
        f = base / f"{record.id}.npz"
        if not f.exists():
            continue
        with np.load(f) as z:
            have.append(record)
            last.append(z["last"].astype(np.float32))
            marks.append(z["marks"].astype(np.float32))
            ids.append([str(i) for i in z["ids"]])
            p_allow.append(float(z["p_allow"]))
            prefill.append(float(z["prefill_s"]))
    # the mean over the action's tokens, from `benchmarks.probes.reads extract` (a cache of
    # its own: a record without it leaves the whole read out)
    spans = [span_dir(sha) / f"{r.id}.npz" for r in have]
    action_mean = None
    if have and all(f.exists() for f in spans):
        action_mean = np.stack([np.load(f)["mean"].astype(np.float32) for f in spans])
    feats = {
        "last": np.stack(last) if last else np.zeros((0, 0, 0)),  # (n, layers, d)
        "action_mean": action_mean,  # (n, layers, d) or None
        "marks": marks,  # list of (layers, m, d)
        "ids": ids,
        "p_allow": np.array(p_allow),
        "prefill_s": np.array(prefill),
        "gold": [set(gold_ids(r, pack)) for r in have],
        "y": np.array([r.unsafe for r in have], dtype=int),
    }
    return have, feats
