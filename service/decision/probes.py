"""Trained linear probes on a model's hidden states: the decision (is this action unsafe?)
and evidence relevance (does this item apply to this action?), read from one prefill.

A probe file is small JSON under `models/probes/`, written by `python -m benchmarks.probes train`. It names
the model (sha256), the layer and the prompt version it was trained for; the service refuses a
probe whose model or prompt differs, because its weights mean nothing for another model.
Serving needs numpy only (it comes with llama-cpp-python); scikit-learn is for training."""

from __future__ import annotations

import hashlib
import json
import re
from collections.abc import Sequence
from dataclasses import dataclass
from pathlib import Path
from typing import Any

from service.decision.ood import OodGuard
from service.decision.prompt import ACTION_SPAN, PROMPT_VERSION, render_evidence
from service.errors import ConfigurationError
from service.schemas import EvidenceItem

# 2: an out-of-distribution guard is part of the file (format 1 had none, and is refused)
PROBE_FORMAT = 2
# The prompt the probes read: the generation prompt plus the evidence roll-call.
PROBE_PROMPT_VERSION = f"{PROMPT_VERSION}+rollcall1"


class ProbeMismatchError(ConfigurationError):
    """The probe was trained for another model or prompt."""


@dataclass(frozen=True)
class LinearProbe:
    """Standardise, then logistic regression, then Platt scaling fitted on held-out folds."""

    layer: int
    mean: Any  # numpy arrays, shape (n_embd,)
    scale: Any
    coef: Any
    intercept: float
    platt_a: float = 1.0
    platt_b: float = 0.0

    def score(self, x: Any) -> Any:
        """The raw logit, for one vector or a matrix of row vectors."""
        return ((x - self.mean) / self.scale) @ self.coef + self.intercept

    def prob(self, x: Any) -> Any:
        import numpy as np

        z = self.platt_a * self.score(x) + self.platt_b
        return 1.0 / (1.0 + np.exp(-z))

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "mean": [round(float(v), 6) for v in self.mean],
            "scale": [round(float(v), 6) for v in self.scale],
            "coef": [round(float(v), 6) for v in self.coef],
            "intercept": float(self.intercept),
            "platt_a": float(self.platt_a),
            "platt_b": float(self.platt_b),
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> LinearProbe:
        import numpy as np

        return cls(
            layer=int(raw["layer"]),
            mean=np.asarray(raw["mean"], np.float32),
            scale=np.asarray(raw["scale"], np.float32),
            coef=np.asarray(raw["coef"], np.float32),
            intercept=float(raw["intercept"]),
            platt_a=float(raw.get("platt_a", 1.0)),
            platt_b=float(raw.get("platt_b", 0.0)),
        )


def evidence_digest(item: EvidenceItem) -> str:
    """How the item reads in the prompt, hashed: an item probe knows an item by its id and
    its text, so a pack that reuses an id for another rule is not cited from it."""
    return hashlib.sha256(render_evidence(item).encode()).hexdigest()[:16]


def cite(probs: Any, ids: Sequence[str], threshold: float, max_cited: int) -> list[str]:
    """The items whose P(applies) clears the threshold, likeliest first, at most `max_cited`,
    and at least the likeliest one (an unsafe verdict always names its best reason)."""
    ranked = sorted(range(len(ids)), key=lambda j: -float(probs[j]))
    chosen = [ids[j] for j in ranked[:max_cited] if probs[j] >= threshold]
    return chosen or [ids[ranked[0]]]


@dataclass(frozen=True)
class ItemProbe:
    """P(applies) for each evidence item of the pack it was trained with, read from the same
    vector as the decision (no roll-call): a logistic regression per item over one shared
    standardisation. It knows only those items, by id and text (`covers`)."""

    layer: int
    ids: tuple[str, ...]
    digests: tuple[str, ...]  # evidence_digest of each item
    mean: Any  # (n_embd,)
    scale: Any  # (n_embd,)
    coef: Any  # (items, n_embd)
    intercept: Any  # (items,)
    threshold: float  # cite from this P(applies)

    def covers(self, items: Sequence[EvidenceItem]) -> bool:
        known = set(zip(self.ids, self.digests, strict=True))
        return bool(items) and all((i.id, evidence_digest(i)) in known for i in items)

    def probs(self, x: Any, items: Sequence[EvidenceItem]) -> Any:
        """P(applies) for each of `items` (all covered), in their order."""
        import numpy as np

        z = self.coef @ ((x - self.mean) / self.scale) + self.intercept
        p = 1.0 / (1.0 + np.exp(-z))
        at = {item_id: k for k, item_id in enumerate(self.ids)}
        return p[[at[item.id] for item in items]]

    def to_json(self) -> dict[str, Any]:
        return {
            "layer": self.layer,
            "ids": list(self.ids),
            "digests": list(self.digests),
            "mean": [round(float(v), 6) for v in self.mean],
            "scale": [round(float(v), 6) for v in self.scale],
            "coef": [[round(float(v), 6) for v in row] for row in self.coef],
            "intercept": [float(v) for v in self.intercept],
            "threshold": self.threshold,
        }

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ItemProbe:
        import numpy as np

        probe = cls(
            layer=int(raw["layer"]),
            ids=tuple(str(i) for i in raw["ids"]),
            digests=tuple(str(d) for d in raw["digests"]),
            mean=np.asarray(raw["mean"], np.float32),
            scale=np.asarray(raw["scale"], np.float32),
            coef=np.asarray(raw["coef"], np.float32),
            intercept=np.asarray(raw["intercept"], np.float32),
            threshold=float(raw["threshold"]),
        )
        k, d = len(probe.ids), len(probe.mean)
        if len(probe.digests) != k or probe.coef.shape != (k, d) or probe.intercept.shape != (k,):
            raise ConfigurationError("item probe: ids, digests, coef and intercept disagree")
        return probe


@dataclass(frozen=True)
class ProbeSet:
    """The probes for one model and prompt, with the thresholds tuned with them and the guard
    that says when a request lies too far from their training data for them to answer."""

    model: str
    model_sha256: str
    prompt_version: str
    decision: LinearProbe
    relevance: LinearProbe | None
    # allow when P(unsafe) <= allow_below; deny when P(unsafe) >= deny_above; else escalate
    allow_below: float
    deny_above: float
    relevance_threshold: float
    trained: dict[str, Any]  # how and on what it was trained, and its figures
    guard: OodGuard
    # where the decision probe and its guard read: the prompt's last token, or the mean over
    # the proposed action's tokens (service.decision.prompt.ACTION_SPAN)
    decision_read: str = "last"
    # cites the pack it was trained with from the decision's vector, without the roll-call
    items: ItemProbe | None = None

    def decision_span(self, roll_call: bool) -> tuple[str, str | None] | None:
        """The span to ask the backend to average, if the decision reads one: the proposed
        action up to the roll-call's header, or to the prompt's end without a roll-call."""
        if self.decision_read != "action_mean":
            return None
        return ACTION_SPAN if roll_call else (ACTION_SPAN[0], None)

    @property
    def decides_before_roll_call(self) -> bool:
        """Whether the decision (and its guard) can be read from a prefill that stops at
        the roll-call's header: the action's mean ends there, and a causal model's states
        before it do not depend on what follows. The roll-call is then read only to cite."""
        return self.decision_read == "action_mean"

    def items_for(self, evidence: Sequence[EvidenceItem]) -> ItemProbe | None:
        """The item probe, when it knows every item of `evidence`; else the roll-call's
        relevance probe cites."""
        return self.items if self.items is not None and self.items.covers(evidence) else None

    @property
    def decision_layers(self) -> tuple[int, ...]:
        """The layers read from the decision's vector: the decision, its guard, the items."""
        wanted = {self.decision.layer, self.guard.layer}
        if self.items is not None:
            wanted.add(self.items.layer)
        return tuple(sorted(wanted))

    def decision_rows(self, states: Any) -> Any:
        """The rows of a HiddenStates (one per layer read) that the decision probe and the
        guard read."""
        return states.span_mean if self.decision_read == "action_mean" else states.last

    @property
    def layers(self) -> tuple[int, ...]:
        wanted = set(self.decision_layers)
        if self.relevance is not None:
            wanted.add(self.relevance.layer)
        return tuple(sorted(wanted))

    def to_json(self) -> dict[str, Any]:
        return {
            "format": PROBE_FORMAT,
            "model": self.model,
            "model_sha256": self.model_sha256,
            "prompt_version": self.prompt_version,
            "allow_below": self.allow_below,
            "deny_above": self.deny_above,
            "relevance_threshold": self.relevance_threshold,
            "trained": self.trained,
            "decision": self.decision.to_json(),
            "relevance": self.relevance.to_json() if self.relevance else None,
            "guard": self.guard.to_json(),
            "decision_read": self.decision_read,
            "items": self.items.to_json() if self.items else None,
        }

    def save(self, path: Path) -> None:
        path.parent.mkdir(parents=True, exist_ok=True)
        # one key a line, but a list of numbers on one line: the guard's matrices would
        # otherwise take a line per number
        text = json.dumps(self.to_json(), indent=1)
        text = re.sub(r"(?<=[\[,])\n\s*(?=-?\d)", "", text)
        text = re.sub(r"(?<=\d)\n\s*(?=\])", "", text)
        path.write_text(text + "\n")

    @classmethod
    def load(cls, path: Path) -> ProbeSet:
        try:
            return cls.from_json(json.loads(path.read_text("utf-8")))
        except ConfigurationError as exc:
            raise ConfigurationError(f"{path}: {exc.message}") from exc
        except (OSError, ValueError, KeyError, TypeError) as exc:
            raise ConfigurationError(f"cannot read probe {path}: {exc}") from exc

    @classmethod
    def from_json(cls, raw: dict[str, Any]) -> ProbeSet:
        if raw.get("format") == 1:
            raise ConfigurationError(
                "probe format 1 has no out-of-distribution guard, and a probe without one "
                "answers confidently on requests unlike its training data; add one with "
                "`python -m benchmarks.probes guard` (docs/probes.md)"
            )
        if raw.get("format") != PROBE_FORMAT:
            raise ConfigurationError(f"probe format {raw.get('format')!r} unknown")
        return cls(
            model=str(raw["model"]),
            model_sha256=str(raw["model_sha256"]),
            prompt_version=str(raw["prompt_version"]),
            decision=LinearProbe.from_json(raw["decision"]),
            relevance=LinearProbe.from_json(raw["relevance"]) if raw["relevance"] else None,
            allow_below=float(raw["allow_below"]),
            deny_above=float(raw["deny_above"]),
            relevance_threshold=float(raw["relevance_threshold"]),
            trained=dict(raw.get("trained") or {}),
            guard=OodGuard.from_json(raw["guard"]),
            decision_read=_decision_read(raw.get("decision_read", "last")),
            items=ItemProbe.from_json(raw["items"]) if raw.get("items") else None,
        )

    def check(self, model_sha256: str) -> None:
        """Refuse a probe trained for another model or prompt."""
        if self.model_sha256 != model_sha256:
            raise ProbeMismatchError(
                f"probe for {self.model} (sha256 {self.model_sha256[:12]}) does not match the "
                f"tier's model (sha256 {model_sha256[:12]})"
            )
        if self.prompt_version != PROBE_PROMPT_VERSION:
            raise ProbeMismatchError(
                f"probe trained on prompt {self.prompt_version}, the service renders "
                f"{PROBE_PROMPT_VERSION}; train it again (python -m benchmarks.probes train)"
            )


DECISION_READS = ("last", "action_mean")


def _decision_read(value: Any) -> str:
    if value not in DECISION_READS:
        raise ConfigurationError(f"decision_read {value!r} unknown (one of {DECISION_READS})")
    return str(value)
