"""The backend registry and the tier settings of the engines without a GGUF: any tier can use
any backend, configured from the file or the environment."""

from __future__ import annotations

import pytest
from pydantic import ValidationError

from service.app import create_app
from service.backends import create_backend
from service.backends.openai import OpenAICompatibleBackend
from service.ops.weights import ModelStore
from service.settings import TierSettings, load_settings
from tests.conftest import fake_settings, running_app, sample_request
from tests.realserver import free_port
from tests.scripted_engine import Reply, content_events, scripted_engine


@pytest.mark.parametrize(
    ("fields", "message"),
    [
        ({"backend": "openai"}, "needs base_url"),
        ({"backend": "openai", "base_url": "http://h:1/v1"}, "needs base_url"),
        ({"backend": "openai", "base_urls": ["h:1"], "remote_model": "m"}, "base_urls"),
        ({"backend": "openai", "base_url": "h:1", "remote_model": "m"}, "base_url"),
        ({"backend": "mlx"}, "needs mlx_model"),
    ],
)
def test_engine_settings_are_checked(fields: dict[str, str], message: str) -> None:
    with pytest.raises(ValidationError, match=message):
        TierSettings(**fields)  # type: ignore[arg-type]


def test_an_openai_tier_from_the_environment_needs_no_gguf(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    monkeypatch.setenv("GATEKEEPER_TIERS__STRATEGIC__BACKEND", "openai")
    monkeypatch.setenv("GATEKEEPER_TIERS__STRATEGIC__BASE_URL", "http://gpu-box:8000/v1")
    monkeypatch.setenv("GATEKEEPER_TIERS__STRATEGIC__REMOTE_MODEL", "Qwen/Qwen3-8B")
    monkeypatch.setenv("GATEKEEPER_TIERS__STRATEGIC__API_KEY", "sk-secret")
    settings = load_settings()
    tier = settings.tiers["strategic"]
    assert tier.api_key is not None and "sk-secret" not in repr(tier)
    backend = create_backend(tier, ModelStore(settings))
    assert isinstance(backend, OpenAICompatibleBackend)
    assert backend.model == "Qwen/Qwen3-8B" and backend.context_size == tier.n_ctx


async def test_an_openai_tier_loads_and_answers_and_an_unreachable_one_fails() -> None:
    pieces = ['{"decision": "', 'deny", "evidence": ["R1"], "history": [1], ', '"rationale": "no"}']
    with scripted_engine(Reply(content_events(pieces))) as (url, bodies):
        dead = f"http://127.0.0.1:{free_port()}/v1"
        settings = fake_settings(
            tiers={
                "mid": TierSettings(backend="openai", base_url=dead, remote_model="gone"),
                "strategic": TierSettings(backend="openai", base_url=url, remote_model="big"),
            },
            default_tier="strategic",
        )
        async with running_app(create_app(settings)) as client:
            ready = (await client.get("/readyz")).json()
            states = {t["name"]: (t["state"], t["detail"] or "") for t in ready["tiers"]}
            body = (await client.post("/evaluate", json=sample_request())).json()
            pinned = (await client.post("/evaluate", json=sample_request(tier="mid"))).json()
    assert states["strategic"][0] == "loaded"
    assert states["mid"][0] == "failed" and "cannot reach the engine" in states["mid"][1]
    assert body["decision"] == "deny" and body["degraded"] is False and body["model"] == "big"
    assert bodies[0]["model"] == "big" and bodies[0]["response_format"]["type"] == "json_schema"
    assert pinned["degraded"] is True and pinned["reason"] == "model_unavailable"
