"""API keys (hashed, constant-time), the /metrics key and the per-key rate limit."""

from __future__ import annotations

import contextlib
from pathlib import Path

import pytest

from service.backends.fake import FakeBackend, Script
from service.cli.main import main
from service.errors import AuthenticationError, RateLimitedError
from service.ops.audit import AuditQuery, read_decisions
from service.ops.auth import ANONYMOUS, Authenticator, RateLimiter, new_token, token_sha256
from service.settings import AuthSettings
from tests.conftest import answer, fake_app, sample_request
from tests.test_api import assert_error

TOKEN_A = "gk_token-of-agent-a"
TOKEN_M = "gk_token-of-prometheus"


def _auth(**values: object) -> AuthSettings:
    return AuthSettings.model_validate(
        {"api_keys": {"agent-a": token_sha256(TOKEN_A), "agent-b": token_sha256("gk_b")}, **values}
    )


def test_no_keys_means_open_and_anonymous() -> None:
    auth = Authenticator(AuthSettings())
    assert auth.open and auth.authorize(None) == ANONYMOUS


def test_keys_are_matched_by_hash_and_nothing_else_passes() -> None:
    auth = Authenticator(_auth())
    assert auth.authorize(TOKEN_A) == "agent-a" and auth.authorize("gk_b") == "agent-b"
    for wrong in (None, "", TOKEN_A[:-1], TOKEN_A + "x", token_sha256(TOKEN_A), " " + TOKEN_A):
        with pytest.raises(AuthenticationError):
            auth.authorize(wrong)


def test_every_key_is_compared_in_constant_time_whatever_the_token(
    monkeypatch: pytest.MonkeyPatch,
) -> None:
    # no early exit: a right key, a wrong key and no key all cost one constant-time comparison
    # per configured key, so the time says nothing about which key (or prefix) was close
    import hmac

    calls: list[int] = []
    real = hmac.compare_digest

    def counting(a: bytes, b: bytes) -> bool:
        calls.append(len(a))
        return real(a, b)

    monkeypatch.setattr(hmac, "compare_digest", counting)
    auth = Authenticator(_auth())
    for token in (TOKEN_A, "gk_b", "gk_wrong", None):
        calls.clear()
        with contextlib.suppress(AuthenticationError):
            auth.authorize(token)
        assert calls == [64, 64], token  # both keys, always sha256 hex digests


def test_settings_refuse_a_key_that_is_not_a_sha256() -> None:
    with pytest.raises(ValueError):
        AuthSettings.model_validate({"api_keys": {"a": TOKEN_A}})


def test_rate_limiter_allows_a_burst_then_refills() -> None:
    now = [100.0]
    limiter = RateLimiter(rate_per_s=2.0, burst=3, clock=lambda: now[0])
    assert [limiter.acquire("a") for _ in range(3)] == [0.0, 0.0, 0.0]
    assert limiter.acquire("a") == pytest.approx(0.5)
    assert limiter.acquire("b") == 0.0  # per key
    now[0] += 0.5
    assert limiter.acquire("a") == 0.0
    assert limiter.acquire("a") > 0
    assert RateLimiter(0.0, 1).acquire("a") == 0.0  # 0: no limit


def test_rate_limited_key_gets_a_retry_after() -> None:
    now = [0.0]
    auth = Authenticator(_auth(rate_per_s=0.25, burst=1), clock=lambda: now[0])
    auth.authorize(TOKEN_A)
    with pytest.raises(RateLimitedError) as limited:
        auth.authorize(TOKEN_A)
    assert limited.value.headers() == {"Retry-After": "4"}
    assert auth.authorize("gk_b") == "agent-b"


async def test_api_needs_a_valid_key_and_logs_its_id(tmp_path: Path) -> None:
    backend = FakeBackend(scripts=[Script(answer("deny", ["R1"], []))])
    path = tmp_path / "d.db"
    async with fake_app({"edge": backend}, auth=_auth(), audit={"path": path}) as client:
        missing = await client.post("/evaluate", json=sample_request())
        assert_error(missing, 401, "invalid_api_key")
        assert missing.headers["www-authenticate"] == "Bearer"
        wrong = await client.post(
            "/evaluate", json=sample_request(), headers={"Authorization": "Bearer gk_nope"}
        )
        assert_error(wrong, 401, "invalid_api_key")
        basic = await client.post(
            "/evaluate", json=sample_request(), headers={"Authorization": f"Basic {TOKEN_A}"}
        )
        assert_error(basic, 401, "invalid_api_key")
        # authentication comes before validation: a stranger learns nothing of the schema
        assert_error(await client.post("/evaluate", json={}), 401, "invalid_api_key")
        ok = await client.post(
            "/evaluate",
            json=sample_request(request_id="k-1"),
            headers={"Authorization": f"Bearer {TOKEN_A}"},
        )
        assert ok.status_code == 200, ok.text
        assert len(backend.requests) == 1  # the model was asked for the authorised call only
    [record] = read_decisions(path, AuditQuery())
    assert record.request_id == "k-1" and record.api_key_id == "agent-a"


async def test_api_answers_429_with_retry_after_over_the_rate() -> None:
    backend = FakeBackend(scripts=[Script(answer("allow", [], []))])
    headers = {"Authorization": f"Bearer {TOKEN_A}"}
    async with fake_app({"edge": backend}, auth=_auth(rate_per_s=0.01, burst=2)) as client:
        codes = [
            (await client.post("/evaluate", json=sample_request(), headers=headers))
            for _ in range(3)
        ]
    assert [r.status_code for r in codes] == [200, 200, 429]
    assert_error(codes[2], 429, "rate_limited")
    assert int(codes[2].headers["retry-after"]) >= 99


async def test_metrics_are_open_or_behind_their_own_key() -> None:
    backend = FakeBackend(scripts=[Script(answer("allow", [], []))])
    async with fake_app({"edge": backend}, auth=_auth()) as client:
        assert (await client.get("/metrics")).status_code == 200  # open by default
    protected = _auth(metrics_key_sha256=token_sha256(TOKEN_M))
    async with fake_app({"edge": backend}, auth=protected) as client:
        assert_error(await client.get("/metrics"), 401, "invalid_api_key")
        # an /evaluate key does not open /metrics
        denied = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN_A}"})
        assert_error(denied, 401, "invalid_api_key")
        ok = await client.get("/metrics", headers={"Authorization": f"Bearer {TOKEN_M}"})
        assert ok.status_code == 200 and "gatekeeper_requests" in ok.text


def test_keys_command_prints_a_token_and_its_hash(capsys: pytest.CaptureFixture[str]) -> None:
    assert main(["keys", "new", "agent-7"]) == 0
    out = capsys.readouterr().out
    token = out.split()[1]
    assert token.startswith("gk_") and len(token) > 40
    assert f'{{"agent-7": "{token_sha256(token)}"}}' in out
    assert token not in out.split("token:", 1)[1].split("\n", 1)[1]  # only its hash after
    assert new_token() != new_token()
