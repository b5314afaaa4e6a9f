"""Policy packs: named sets of evidence items (rules, optionally with their triple) that the
server holds, shipped with the package or loaded from the operator's folders."""

from __future__ import annotations

import json
import logging
from dataclasses import dataclass, field
from functools import cached_property
from importlib import resources
from pathlib import Path
from typing import Any

from pydantic import BaseModel, ConfigDict, Field, ValidationError

from service.errors import ConfigurationError, UnknownPolicyError
from service.evidence.retrieval import PackRetriever, query_text
from service.schemas import (
    ID_PATTERN,
    EvaluateRequest,
    EvidenceItem,
    RuleEvidence,
    TripleEvidence,
)

logger = logging.getLogger(__name__)

DEFAULT_PACK = "default"


class PackItem(BaseModel):
    model_config = ConfigDict(extra="ignore")

    id: str = Field(pattern=ID_PATTERN)
    text: str | None = None
    subject: str | None = None
    predicate: str | None = None
    object: str | None = None
    source: str | None = None
    # retrieval and evaluation metadata; never shown to the model as evidence
    keywords: str = ""
    failure_modes: list[str] = Field(default_factory=list)
    risk_types: list[str] = Field(default_factory=list)

    def to_evidence(self, pack: str) -> EvidenceItem:
        source = self.source or f"policy:{pack}"
        if self.text:
            return RuleEvidence(id=self.id, text=self.text, source=source)
        if self.subject and self.predicate and self.object:
            return TripleEvidence(
                id=self.id,
                subject=self.subject,
                predicate=self.predicate,
                object=self.object,
                source=source,
            )
        raise ValueError(f"pack item {self.id!r} has neither text nor a full triple")


class PackFile(BaseModel):
    model_config = ConfigDict(extra="ignore")

    name: str = Field(pattern=r"^[a-z0-9][a-z0-9_\-]{0,63}$")
    version: str = "1"
    items: list[PackItem] = Field(min_length=1)


@dataclass(frozen=True)
class PolicyPack:
    name: str
    version: str
    items: tuple[EvidenceItem, ...]
    meta: tuple[PackItem, ...] = field(default=(), compare=False, repr=False)

    @cached_property
    def retriever(self) -> PackRetriever:
        """Built on first use: a pack nobody retrieves from costs nothing."""
        return PackRetriever(self.items, [m.keywords for m in self.meta])

    def retrieve(self, request: EvaluateRequest, k: int) -> list[EvidenceItem]:
        """The `k` items most relevant to this request, most relevant first."""
        return self.retriever.rank(query_text(request), k)

    def tagged(self, *, failure_mode: str | None, risk_type: str | None) -> set[str]:
        """Ids of the items tagged with this failure mode or risk type."""
        return {
            m.id
            for m in self.meta
            if (failure_mode and failure_mode in m.failure_modes)
            or (risk_type and risk_type in m.risk_types)
        }


def _parse(raw: Any, origin: str) -> PolicyPack:
    try:
        pack = PackFile.model_validate(raw)
        items = tuple(item.to_evidence(pack.name) for item in pack.items)
    except (ValidationError, ValueError) as exc:
        raise ConfigurationError(f"invalid policy pack {origin}: {exc}") from exc
    ids = [i.id for i in items]
    if len(set(ids)) != len(ids):
        raise ConfigurationError(f"policy pack {origin} repeats an item id")
    return PolicyPack(name=pack.name, version=pack.version, items=items, meta=tuple(pack.items))


class PolicyLibrary:
    """All packs the server knows, by name. Loaded once at start-up."""

    def __init__(self, extra_dirs: list[Path] | None = None) -> None:
        self._packs: dict[str, PolicyPack] = {}
        for entry in resources.files("service.evidence").joinpath("packs").iterdir():
            if entry.name.endswith(".json"):
                self._add(_parse(json.loads(entry.read_text("utf-8")), entry.name))
        for folder in extra_dirs or []:
            if not folder.is_dir():
                raise ConfigurationError(f"policy folder not found: {folder}")
            for path in sorted(folder.glob("*.json")):
                self._add(_parse(json.loads(path.read_text("utf-8")), str(path)))

    def _add(self, pack: PolicyPack) -> None:
        if pack.name in self._packs:
            logger.info("policy pack %s replaced by a later definition", pack.name)
        self._packs[pack.name] = pack

    @property
    def names(self) -> list[str]:
        return sorted(self._packs)

    def get(self, name: str) -> PolicyPack:
        pack = self._packs.get(name)
        if pack is None:
            raise UnknownPolicyError(f"unknown policy pack {name!r}", param="policy")
        return pack
