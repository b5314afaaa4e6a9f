"""The project's error hierarchy. Each error carries its HTTP status and error code, so the
API layer maps them without inspecting messages."""

from __future__ import annotations


class GatekeeperError(Exception):
    status_code = 500
    error_type = "internal_error"
    code = "internal_error"

    def __init__(self, message: str, *, param: str | None = None) -> None:
        super().__init__(message)
        self.message = message
        self.param = param

    def headers(self) -> dict[str, str]:
        """HTTP headers the error response carries (WWW-Authenticate, Retry-After)."""
        return {}


class BadRequestError(GatekeeperError):
    status_code = 400
    error_type = "invalid_request_error"
    code = "bad_request"


class UnknownTierError(BadRequestError):
    code = "unknown_tier"


class UnknownPolicyError(BadRequestError):
    code = "unknown_policy"


class PayloadTooLargeError(GatekeeperError):
    status_code = 413
    error_type = "invalid_request_error"
    code = "payload_too_large"


class ConfigurationError(GatekeeperError):
    """Settings or the tier table are inconsistent; raised at start-up, never per request."""

    code = "configuration_error"


class ModelStoreError(GatekeeperError):
    """Weights are missing, incomplete or fail their checksum."""

    error_type = "model_error"
    code = "model_store_error"


class ModelMissingError(ModelStoreError):
    """The model is not installed, or its file is not where the tier says: the tier is
    unavailable (an operator installs it) rather than failed."""


class BackendError(GatekeeperError):
    """An inference engine failed; adapters raise this at their boundary."""

    error_type = "model_error"
    code = "backend_error"


class BackendDeadlineError(BackendError):
    """The engine stopped at the request's deadline."""


class BackendUnavailableError(BackendError):
    code = "backend_unavailable"


class EngineMissingError(BackendUnavailableError):
    """An optional engine (llama-cpp-python, mlx-lm, llguidance) is not installed."""


class BackendOverloadedError(BackendError):
    """Every replica of a remote engine is at its limit or answered 429/503: fail closed as
    'overloaded' at once rather than queue behind it."""

    code = "backend_overloaded"


class ReplicaLostError(BackendError):
    """A replica went away mid-answer. Nothing was returned to the caller, so the request
    may be sent again (to another replica) with a fresh loop detector."""


class AuthenticationError(GatekeeperError):
    """No API key, or one that matches no configured key."""

    status_code = 401
    error_type = "authentication_error"
    code = "invalid_api_key"

    def headers(self) -> dict[str, str]:
        return {"WWW-Authenticate": "Bearer"}


class RateLimitedError(GatekeeperError):
    status_code = 429
    error_type = "rate_limit_error"
    code = "rate_limited"

    def __init__(self, message: str, *, retry_after_s: int) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s

    def headers(self) -> dict[str, str]:
        return {"Retry-After": str(self.retry_after_s)}


class DecisionLogError(GatekeeperError):
    """The decision could not be made durable, so it is not sent: no unlogged decisions."""

    status_code = 503
    error_type = "internal_error"
    code = "decision_log_unavailable"
