"""Engine adapters behind one protocol, chosen by name from the tier table."""

from __future__ import annotations

from collections.abc import Callable
from pathlib import Path

from service.backends.base import Backend
from service.errors import ConfigurationError
from service.settings import TierSettings

BackendFactory = Callable[[str, Path, TierSettings], Backend]


def _llama_cpp(model: str, path: Path, tier: TierSettings) -> Backend:
    from service.backends.llama_cpp import LlamaCppBackend

    return LlamaCppBackend(
        model,
        path,
        n_ctx=tier.n_ctx,
        n_threads=tier.n_threads,
        n_batch=tier.n_batch,
        chat_template=tier.chat_template,
    )


# A registry rather than an if/elif chain; the imports stay lazy so that a missing optional
# engine only fails the tiers that use it.
BACKENDS: dict[str, BackendFactory] = {"llama_cpp": _llama_cpp}


def create_backend(model: str, path: Path, tier: TierSettings) -> Backend:
    factory = BACKENDS.get(tier.backend)
    if factory is None:
        raise ConfigurationError(f"backend {tier.backend!r} cannot serve a GGUF model")
    return factory(model, path, tier)
