"""API keys and per-key rate limits.

Keys are configured as sha256 hashes of their bearer tokens, so the configuration holds no
secret. A presented token is hashed and compared with every configured hash in constant time,
without stopping at the first match, so that the time taken says nothing about which key, or
which prefix of a key, was close."""

from __future__ import annotations

import hashlib
import hmac
import math
import secrets
import time
from collections.abc import Callable
from dataclasses import dataclass

from service.errors import AuthenticationError, RateLimitedError
from service.settings import AuthSettings

# The key id recorded for calls when no keys are configured (the API is open).
ANONYMOUS = "anonymous"
TOKEN_PREFIX = "gk_"


def token_sha256(token: str) -> str:
    return hashlib.sha256(token.encode()).hexdigest()


def new_token() -> str:
    """A fresh bearer token: 256 random bits."""
    return TOKEN_PREFIX + secrets.token_urlsafe(32)


def _matches(token: str | None, digests: dict[str, str]) -> str | None:
    """The id of the key whose hash matches `token`, looking at every key."""
    presented = token_sha256(token or "").encode()
    found: str | None = None
    for key_id, digest in digests.items():
        if hmac.compare_digest(presented, digest.encode()) and token:
            found = key_id
    return found


@dataclass
class _Bucket:
    tokens: float
    updated: float


class RateLimiter:
    """A token bucket per key: `burst` requests at once, refilled at `rate_per_s`."""

    def __init__(
        self, rate_per_s: float, burst: int, clock: Callable[[], float] = time.monotonic
    ) -> None:
        self.rate_per_s = rate_per_s
        self.burst = burst
        self._clock = clock
        self._buckets: dict[str, _Bucket] = {}

    def acquire(self, key_id: str) -> float:
        """0 when the call may go ahead, else the seconds until it may."""
        if self.rate_per_s <= 0:
            return 0.0
        now = self._clock()
        bucket = self._buckets.setdefault(key_id, _Bucket(float(self.burst), now))
        bucket.tokens = min(
            float(self.burst), bucket.tokens + (now - bucket.updated) * self.rate_per_s
        )
        bucket.updated = now
        if bucket.tokens >= 1.0:
            bucket.tokens -= 1.0
            return 0.0
        return (1.0 - bucket.tokens) / self.rate_per_s


class Authenticator:
    def __init__(self, settings: AuthSettings, clock: Callable[[], float] = time.monotonic):
        self._keys = dict(settings.api_keys)
        self._metrics_key = settings.metrics_key_sha256
        self.limiter = RateLimiter(settings.rate_per_s, settings.burst, clock)

    @property
    def open(self) -> bool:
        return not self._keys

    def authorize(self, token: str | None) -> str:
        """The caller's key id, after the key check and the rate limit."""
        if self.open:
            key_id = ANONYMOUS
        else:
            matched = _matches(token, self._keys)
            if matched is None:
                raise AuthenticationError(
                    "a valid API key is required: Authorization: Bearer <key>"
                    if token
                    else "missing API key: send Authorization: Bearer <key>"
                )
            key_id = matched
        wait_s = self.limiter.acquire(key_id)
        if wait_s > 0:
            raise RateLimitedError(
                f"rate limit of {self.limiter.rate_per_s:g}/s exceeded for key {key_id!r}",
                retry_after_s=max(1, math.ceil(wait_s)),
            )
        return key_id

    def authorize_metrics(self, token: str | None) -> None:
        if self._metrics_key is None:
            return
        if _matches(token, {"metrics": self._metrics_key}) is None:
            raise AuthenticationError("/metrics needs its API key: Authorization: Bearer <key>")
