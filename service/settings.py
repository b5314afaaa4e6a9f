"""One settings tree, read in one place: defaults < `models/tiers.toml` (or GATEKEEPER_CONFIG)
< GATEKEEPER_* environment variables (nested with `__`, e.g. GATEKEEPER_TIERS__EDGE__N_CTX)."""

from __future__ import annotations

import os
from pathlib import Path
from typing import Annotated, Literal

from pydantic import BaseModel, ConfigDict, Field, SecretStr, field_validator, model_validator
from pydantic_settings import (
    BaseSettings,
    PydanticBaseSettingsSource,
    SettingsConfigDict,
    TomlConfigSettingsSource,
)

from service.errors import ConfigurationError
from service.guards.loops import LoopSettings

PROJECT_ROOT = Path(__file__).resolve().parents[1]
DEFAULT_CONFIG = PROJECT_ROOT / "models" / "tiers.toml"
CONFIG_ENV = "GATEKEEPER_CONFIG"
# Capability order, weakest first; the router prefers the most capable tier that fits.
TIER_ORDER = ("edge", "mid", "strategic")


class _Section(BaseModel):
    model_config = ConfigDict(extra="forbid")


class ModelSource(_Section):
    """A catalogue entry: where a model's GGUF comes from and how to check it."""

    description: str = ""
    path: Path | None = Field(default=None, description="An explicit GGUF file.")
    package: str | None = Field(
        default=None, description="Import name of a pip package that ships the GGUF file."
    )
    package_file: str | None = Field(default=None, description="The GGUF's name in `package`.")
    parts: list[str] = Field(
        default_factory=list,
        description="Import names of pip packages holding data/partNN.bin chunks, in order.",
    )
    part_glob: str = Field(
        default="part*.bin", description="The chunk files inside each part package's data/."
    )
    file: str | None = Field(default=None, description="Name of the assembled file in the cache.")
    requirements: list[str] = Field(
        default_factory=list, description="pip requirement specs that install this model."
    )
    sha256: str | None = Field(default=None, pattern=r"^[0-9a-f]{64}$")
    size_bytes: int | None = Field(default=None, ge=0)

    @model_validator(mode="after")
    def _one_source(self) -> ModelSource:
        kinds = [self.path is not None, self.package is not None, bool(self.parts)]
        if sum(kinds) != 1:
            raise ValueError("a model source names exactly one of: path, package, parts")
        if self.package is not None and not self.package_file:
            raise ValueError("'package' needs 'package_file'")
        if self.parts and not self.file:
            raise ValueError("'parts' needs 'file', the assembled file's name")
        return self


class TierSettings(_Section):
    backend: Literal["llama_cpp", "openai", "mlx", "fake"] = Field(
        default="llama_cpp", description="Which engine adapter serves this tier."
    )
    model: str | None = Field(default=None, description="A name from the [models] catalogue.")
    model_path: Path | None = Field(default=None, description="Any GGUF file; overrides `model`.")
    model_sha256: str | None = Field(
        default=None, pattern=r"^[0-9a-f]{64}$", description="Checked when `model_path` is set."
    )
    n_ctx: int = Field(default=4096, ge=512, le=131_072, description="Context window, tokens.")
    n_threads: int | None = Field(default=None, ge=1, le=256, description="None: all cores.")
    n_batch: int = Field(default=512, ge=32, le=8192)
    max_tokens: int = Field(default=192, ge=8, le=4096, description="Hard cap on generated tokens.")
    rationale_chars: int = Field(default=240, ge=0, le=2000, description="maxLength of rationale.")
    revision_chars: int = Field(default=240, ge=16, le=2000, description="maxLength of revision.")
    max_cited: int = Field(default=4, ge=0, le=32, description="maxItems of cited evidence.")
    revise: bool = Field(
        default=False,
        description="After an unsafe verdict, offer a safer action of the same shape, checked "
        "by the same judge before it is offered (docs/revise.md), when the request does not "
        "say (its `revise`) and the budget left holds a short generation and a read.",
    )
    chat_template: Literal["auto", "none"] = Field(
        default="auto", description="'auto': the GGUF's own template; 'none': raw completion."
    )
    temperature: float = Field(default=0.0, ge=0.0, le=2.0)
    grammar_engine: Literal["llguidance", "llama_cpp"] = Field(
        default="llguidance",
        description="llama_cpp tiers: what holds generation to the request's grammar. "
        "'llguidance' masks the logits with llguidance (cost independent of the vocabulary; "
        "decode at ~0.99x free speed); 'llama_cpp' uses llama.cpp's GBNF sampler (~0.7x on "
        "Qwen's 151k vocabulary). mlx tiers always use llguidance; see docs/speed.md.",
    )
    flash_attn: bool = Field(
        default=True, description="llama_cpp tiers: llama.cpp's flash attention (CPU too)."
    )
    allow_threshold: float | None = Field(
        default=None,
        ge=0.0,
        le=1.0,
        description="This tier's least P(allow) for an allow (None: the global "
        "allow_threshold); tuned per model on the tuning part of the development data.",
    )
    max_queue: int = Field(
        default=4, ge=1, le=1024, description="Requests waiting or running on the tier, at most."
    )
    probe: Path | None = Field(
        default=None,
        description="A trained probe file (models/probes/*.json, relative paths from the "
        "project root): the tier decides and cites from its model's hidden states after one "
        "prefill, and generates only the rationale. llama_cpp tiers only; a probe trained for "
        "another model or prompt is refused (the tier then decides by generation).",
    )
    # Remote and MLX engines (backend = "openai" / "mlx"); see docs/backends.md.
    base_url: str | None = Field(
        default=None,
        pattern=r"^https?://",
        description="openai: the engine's API root, e.g. http://gpu-box:8000/v1.",
    )
    api_key: SecretStr | None = Field(default=None, description="openai: sent as a Bearer token.")
    remote_model: str | None = Field(
        default=None, description="openai: the model name the engine serves."
    )
    base_urls: list[Annotated[str, Field(pattern=r"^https?://")]] = Field(
        default_factory=list,
        description="openai: several replicas of one engine behind this tier (each an API "
        "root like base_url; base_url, when set, is the first). Each request goes to the live "
        "replica with the fewest requests in flight; one that fails or times out is ejected "
        "until its health check (/health, else /v1/models) answers again.",
    )
    max_concurrency: int = Field(
        default=16,
        ge=1,
        le=1024,
        description="openai: requests in flight on each replica at once, sent from the event "
        "loop through a pooled async client; at that many per live replica the tier is "
        "saturated (routing goes down, a pinned request is answered 'overloaded'). 1: the "
        "serial path, one request at a time on the tier's worker thread, queued up to "
        "max_queue (for an engine with one slot). Local tiers always run one at a time.",
    )
    health_interval_s: float = Field(
        default=2.0, gt=0, le=600, description="openai: seconds between replica health checks."
    )
    eject_s: float = Field(
        default=5.0,
        ge=0,
        le=3600,
        description="openai: a failed replica stays out at least this long, then returns at "
        "its first good health check.",
    )
    busy_s: float = Field(
        default=1.0,
        ge=0,
        le=600,
        description="openai: after a 429 or 503 without Retry-After, the replica gets no "
        "request for this long (the tier is saturated while every replica is busy).",
    )
    connect_timeout_s: float = Field(
        default=2.0, gt=0, le=60, description="openai: connect timeout (capped by the budget)."
    )
    max_retries: int = Field(
        default=2,
        ge=0,
        le=10,
        description="openai: resends on connection errors before any "
        "token, while the budget lasts.",
    )
    response_format: Literal["json_schema", "json_object"] = Field(
        default="json_schema",
        description="openai: how the schema is sent: 'json_schema' (OpenAI, vLLM, the llama.cpp "
        "server, Ollama) or 'json_object' with a schema (llama-cpp-python's server).",
    )
    top_logprobs: int = Field(
        default=0,
        ge=0,
        le=20,
        description="openai: ask for this many log-probabilities to "
        "read the decision's probability (0: none; confidence is then 0.5).",
    )
    mlx_model: str | None = Field(
        default=None, description="mlx: a local mlx-lm model folder (or a hub id mlx-lm knows)."
    )

    @field_validator("probe", mode="before")
    @classmethod
    def _no_probe(cls, value: object) -> object:
        # GATEKEEPER_TIERS__EDGE__PROBE=none (or empty) turns a configured probe off
        return None if isinstance(value, str) and value.strip().lower() in ("", "none") else value

    @property
    def probe_path(self) -> Path | None:
        if self.probe is None:
            return None
        path = self.probe.expanduser()
        return path if path.is_absolute() else PROJECT_ROOT / path

    @property
    def replica_urls(self) -> list[str]:
        """openai: every replica's API root, base_url first, without repeats."""
        urls = ([self.base_url] if self.base_url else []) + self.base_urls
        return list(dict.fromkeys(u.rstrip("/") for u in urls))

    @model_validator(mode="after")
    def _engine_named(self) -> TierSettings:
        if self.backend == "openai" and not (self.replica_urls and self.remote_model):
            raise ValueError("backend 'openai' needs base_url (or base_urls) and remote_model")
        if self.backend == "mlx" and not self.mlx_model:
            raise ValueError("backend 'mlx' needs mlx_model")
        return self


# ---- operations: the decision log, API keys, shutdown ------------------------------------
_SHA256_HEX = r"^[0-9a-f]{64}$"


class AuditSettings(_Section):
    """The durable decision log: SQLite in WAL mode, each decision committed before it is sent."""

    enabled: bool = Field(default=True, description="Append every decision to the log.")
    path: Path = Field(
        default=Path.home() / ".local" / "state" / "gatekeeper" / "decisions.db",
        description="The SQLite file (created with its folder).",
    )
    redact: bool = Field(
        default=True,
        description="Keep request content (goal, history, action, evidence) and the model's "
        "rationale out of the log and the logs; the request is kept as its sha256 only.",
    )


class AuthSettings(_Section):
    """Bearer API keys, stored as sha256 hashes. No keys: /evaluate is open."""

    api_keys: dict[str, Annotated[str, Field(pattern=_SHA256_HEX)]] = Field(
        default_factory=dict,
        description="Key id -> sha256 (hex) of its bearer token (`gatekeeper keys new ID`).",
    )
    metrics_key_sha256: str | None = Field(
        default=None, pattern=_SHA256_HEX, description="Bearer token for /metrics; None: open."
    )
    rate_per_s: float = Field(
        default=0.0, ge=0.0, description="Sustained requests per second per key (0: no limit)."
    )
    burst: int = Field(default=20, ge=1, description="Requests a key may make at once.")


class Settings(BaseSettings):
    model_config = SettingsConfigDict(
        env_prefix="GATEKEEPER_", env_nested_delimiter="__", extra="forbid"
    )

    host: str = Field(default="127.0.0.1", description="Bind address for `gatekeeper serve`.")
    port: int = Field(default=8080, ge=1, le=65535)
    log_level: Literal["debug", "info", "warning", "error"] = "info"
    log_format: Literal["json", "text"] = "json"
    fail_closed_decision: Literal["escalate", "deny"] = Field(
        default="escalate", description="The posture for every fault on the decision path."
    )
    injection_tripwire: bool = Field(
        default=True,
        description="Read each request for text aimed at the judge (service/guards/injection.py) and "
        "answer escalate instead of allow or revise when any is found. Off only for agents "
        "whose ordinary work is such text, and for measuring the model without it.",
    )
    allow_threshold: float = Field(
        default=0.5,
        ge=0.0,
        le=1.0,
        description="An 'allow' needs at least this probability, normalised over the four "
        "decisions, where the engine exposes it; a less certain allow becomes 'escalate'.",
    )
    default_tier: str = Field(default="edge", description="Used when a request pins none.")
    default_latency_budget_ms: int = Field(default=30_000, ge=1, le=600_000)
    max_body_bytes: int = Field(default=1_000_000, ge=1024, description="Larger bodies get 413.")
    max_prompt_evidence: int = Field(
        default=16, ge=1, le=256, description="Evidence items placed in one prompt, at most."
    )
    retrieval_top_k: int = Field(
        default=16,
        ge=1,
        le=256,
        description="Policy-pack rules placed in one prompt, at most; supplied evidence "
        "comes first and counts against max_prompt_evidence. A pack that fits goes whole, "
        "in its own order, as a prefix the KV cache reuses; a larger one is ranked by BM25 "
        "against the action and history and cut.",
    )
    max_turn_chars: int = Field(
        default=1500, ge=64, description="Each history turn is cut to this many characters."
    )
    warmup: bool = Field(
        default=True, description="Measure each tier's speed with one short generation at start."
    )
    latency_quantile: float = Field(
        default=0.9, ge=0.5, le=0.999, description="Routing predicts latency at this quantile."
    )
    latency_window: int = Field(default=64, ge=4, le=10_000, description="Measurements kept.")
    latency_max_age_s: float = Field(default=600.0, gt=0, description="Older ones are dropped.")
    escalate_below: float = Field(
        default=0.0,
        ge=0.0,
        le=1.0,
        description="Re-ask a more capable tier when confidence is below this and the budget "
        "allows (0 turns it off).",
    )
    retry_once: bool = Field(
        default=True, description="Re-ask once after an invalid output or a loop."
    )
    loops: LoopSettings = Field(
        default_factory=LoopSettings, description="Doom-loop detector thresholds."
    )
    model_cache_dir: Path = Field(
        default=Path.home() / ".cache" / "gatekeeper" / "models",
        description="Where GGUF files assembled from pip packages are kept.",
    )
    policy_dirs: list[Path] = Field(
        default_factory=list, description="Extra folders of policy packs (*.json)."
    )
    load_tiers: list[str] | None = Field(
        default=None, description="Load only these tiers (None: every tier with a model)."
    )
    tiers: dict[str, TierSettings] = Field(default_factory=dict)
    models: dict[str, ModelSource] = Field(default_factory=dict)
    # ---- operations
    audit: AuditSettings = Field(default_factory=AuditSettings, description="Decision log.")
    auth: AuthSettings = Field(default_factory=AuthSettings, description="API keys.")
    shutdown_grace_s: float = Field(
        default=10.0,
        ge=0.0,
        le=3600.0,
        description="On SIGTERM, requests not answered within this many seconds get a "
        "fail-closed answer (shutting_down).",
    )

    @model_validator(mode="after")
    def _references_resolve(self) -> Settings:
        for name, tier in self.tiers.items():
            if tier.model is not None and tier.model not in self.models:
                raise ValueError(f"tier {name!r} names unknown model {tier.model!r}")
        if self.tiers and self.default_tier not in self.tiers:
            raise ValueError(f"default_tier {self.default_tier!r} is not a configured tier")
        return self

    def allow_threshold_of(self, tier: str) -> float:
        """The tier's own allow threshold, else the global one (attached tiers have none)."""
        own = self.tiers.get(tier)
        if own is not None and own.allow_threshold is not None:
            return own.allow_threshold
        return self.allow_threshold

    def ordered_tiers(self) -> list[str]:
        """Tier names, weakest first; unknown names go after the standard three."""
        known = [t for t in TIER_ORDER if t in self.tiers]
        return known + sorted(t for t in self.tiers if t not in TIER_ORDER)


def load_settings(config_file: Path | None = None, **overrides: object) -> Settings:
    """Build the settings: `overrides` > environment > config file > defaults."""
    path = config_file or Path(os.environ.get(CONFIG_ENV, DEFAULT_CONFIG))
    if config_file is not None and not path.is_file():
        raise ConfigurationError(f"config file not found: {path}")

    class _FromFile(Settings):
        @classmethod
        def settings_customise_sources(
            cls,
            settings_cls: type[BaseSettings],
            init_settings: PydanticBaseSettingsSource,
            env_settings: PydanticBaseSettingsSource,
            dotenv_settings: PydanticBaseSettingsSource,
            file_secret_settings: PydanticBaseSettingsSource,
        ) -> tuple[PydanticBaseSettingsSource, ...]:
            sources: list[PydanticBaseSettingsSource] = [init_settings, env_settings]
            if path.is_file():
                sources.append(TomlConfigSettingsSource(settings_cls, toml_file=path))
            return tuple(sources)

    try:
        return _FromFile(**overrides)  # type: ignore[arg-type]
    except ValueError as exc:
        raise ConfigurationError(f"invalid configuration ({path}): {exc}") from exc
