"""A small client for the Gatekeeper API (httpx, sync and async)."""

from __future__ import annotations

from typing import Any

import httpx

from service.schemas import ErrorResponse, EvaluateRequest, EvaluateResponse

DEFAULT_URL = "http://127.0.0.1:8080"


class GatekeeperAPIError(Exception):
    def __init__(self, status: int, error: ErrorResponse | None, text: str) -> None:
        message = error.error.message if error else text[:200]
        super().__init__(f"HTTP {status}: {message}")
        self.status = status
        self.error = error


def _request_body(request: EvaluateRequest | dict[str, Any]) -> dict[str, Any]:
    if isinstance(request, EvaluateRequest):
        return request.model_dump(mode="json", exclude_none=True)
    return request


def _parse(response: httpx.Response) -> EvaluateResponse:
    if response.status_code == 200:
        return EvaluateResponse.model_validate_json(response.content)
    try:
        error = ErrorResponse.model_validate_json(response.content)
    except ValueError:
        error = None
    raise GatekeeperAPIError(response.status_code, error, response.text)


class GatekeeperClient:
    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout: float = 120.0, api_key: str | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.Client(base_url=base_url, timeout=timeout, headers=headers)

    def evaluate(self, request: EvaluateRequest | dict[str, Any]) -> EvaluateResponse:
        return _parse(self._http.post("/evaluate", json=_request_body(request)))

    def ready(self) -> bool:
        return self._http.get("/readyz").status_code == 200

    def close(self) -> None:
        self._http.close()

    def __enter__(self) -> GatekeeperClient:
        return self

    def __exit__(self, *_: object) -> None:
        self.close()


class AsyncGatekeeperClient:
    def __init__(
        self, base_url: str = DEFAULT_URL, *, timeout: float = 120.0, api_key: str | None = None
    ) -> None:
        headers = {"Authorization": f"Bearer {api_key}"} if api_key else {}
        self._http = httpx.AsyncClient(base_url=base_url, timeout=timeout, headers=headers)

    async def evaluate(self, request: EvaluateRequest | dict[str, Any]) -> EvaluateResponse:
        return _parse(await self._http.post("/evaluate", json=_request_body(request)))

    async def ready(self) -> bool:
        return (await self._http.get("/readyz")).status_code == 200

    async def aclose(self) -> None:
        await self._http.aclose()

    async def __aenter__(self) -> AsyncGatekeeperClient:
        return self

    async def __aexit__(self, *_: object) -> None:
        await self.aclose()
