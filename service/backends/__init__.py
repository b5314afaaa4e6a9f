"""Engine adapters behind one protocol, chosen by name from the tier table."""

from __future__ import annotations

from collections.abc import Callable

from service.backends.base import Backend
from service.errors import ConfigurationError
from service.ops.weights import ModelStore
from service.settings import TierSettings

# A factory gets the tier's settings and the GGUF store (for the engines that run a local GGUF).
BackendFactory = Callable[[TierSettings, ModelStore], Backend]


def _llama_cpp(tier: TierSettings, store: ModelStore) -> Backend:
    from service.backends.llama_cpp import LlamaCppBackend

    model, path = store.resolve_tier(tier)
    source = store.source(model)
    return LlamaCppBackend(
        model,
        path,
        n_ctx=tier.n_ctx,
        n_threads=tier.n_threads,
        n_batch=tier.n_batch,
        chat_template=tier.chat_template,
        grammar_engine=tier.grammar_engine,
        flash_attn=tier.flash_attn,
        hidden_states=tier.probe is not None,
        sha256=tier.model_sha256 or (source.sha256 if source else None),
    )


def _openai(tier: TierSettings, _store: ModelStore) -> Backend:
    from service.backends.openai import OpenAICompatibleBackend

    assert tier.replica_urls and tier.remote_model is not None  # TierSettings checks
    return OpenAICompatibleBackend(
        tier.remote_model,
        tier.replica_urls,
        api_key=tier.api_key.get_secret_value() if tier.api_key else None,
        context_size=tier.n_ctx,
        connect_timeout_s=tier.connect_timeout_s,
        max_retries=tier.max_retries,
        response_format=tier.response_format,
        top_logprobs=tier.top_logprobs,
        max_concurrency=tier.max_concurrency,
        health_interval_s=tier.health_interval_s,
        eject_s=tier.eject_s,
        busy_s=tier.busy_s,
    )


def _mlx(tier: TierSettings, _store: ModelStore) -> Backend:
    from service.backends.mlx import MlxBackend

    assert tier.mlx_model is not None  # TierSettings checks
    return MlxBackend(tier.mlx_model, n_ctx=tier.n_ctx)


# A registry rather than an if/elif chain; the imports stay lazy so that a missing optional
# engine only fails the tiers that use it.
BACKENDS: dict[str, BackendFactory] = {"llama_cpp": _llama_cpp, "openai": _openai, "mlx": _mlx}


def create_backend(tier: TierSettings, store: ModelStore) -> Backend:
    factory = BACKENDS.get(tier.backend)
    if factory is None:
        raise ConfigurationError(f"no engine adapter is called {tier.backend!r}")
    return factory(tier, store)
