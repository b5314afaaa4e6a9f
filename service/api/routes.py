"""Thin HTTP routes: parse, hand to the pipeline, shape the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from fastapi.security import HTTPAuthorizationCredentials, HTTPBearer
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.api.serving import DecisionService
from service.decision.pipeline import Gatekeeper
from service.ops.auth import Authenticator
from service.schemas import (
    ErrorResponse,
    EvaluateRequest,
    EvaluateResponse,
    HealthResponse,
    ReadyResponse,
)


def get_gatekeeper(request: Request) -> Gatekeeper:
    gatekeeper: Gatekeeper = request.app.state.gatekeeper
    return gatekeeper


GatekeeperDep = Annotated[Gatekeeper, Depends(get_gatekeeper)]


def get_decisions(request: Request) -> DecisionService:
    decisions: DecisionService = request.app.state.decisions
    return decisions


DecisionsDep = Annotated[DecisionService, Depends(get_decisions)]

_bearer = HTTPBearer(
    auto_error=False,
    description="An API key, when the server has keys configured (auth.api_keys).",
)
BearerDep = Annotated[HTTPAuthorizationCredentials | None, Depends(_bearer)]


def api_key_id(request: Request, credentials: BearerDep) -> str:
    """The caller's key id; 401 without a valid key, 429 over its rate."""
    auth: Authenticator = request.app.state.auth
    return auth.authorize(credentials.credentials if credentials else None)


def metrics_access(request: Request, credentials: BearerDep) -> None:
    auth: Authenticator = request.app.state.auth
    auth.authorize_metrics(credentials.credentials if credentials else None)


ApiKeyDep = Annotated[str, Depends(api_key_id)]

_UNAUTHORIZED: dict[int | str, dict[str, Any]] = {
    401: {"model": ErrorResponse, "description": "Missing or wrong API key."},
}

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {
        "model": ErrorResponse,
        "description": "Unknown tier or policy, or a body that cannot be parsed.",
    },
    413: {"model": ErrorResponse, "description": "Body over the configured limit."},
    422: {"model": ErrorResponse, "description": "The body breaks the schema."},
    500: {"model": ErrorResponse, "description": "An internal error."},
    **_UNAUTHORIZED,
    429: {
        "model": ErrorResponse,
        "description": "The key's rate limit is exceeded; retry after `Retry-After` seconds.",
        "headers": {"Retry-After": {"schema": {"type": "integer"}}},
    },
    503: {"model": ErrorResponse, "description": "The decision could not be logged durably."},
}

router = APIRouter()


@router.post(
    "/evaluate",
    operation_id="evaluate",
    response_model=EvaluateResponse,
    responses=_ERRORS,
    summary="Judge a proposed agent action",
)
async def evaluate(
    body: EvaluateRequest, decisions: DecisionsDep, key_id: ApiKeyDep
) -> EvaluateResponse:
    return await decisions.evaluate(body, key_id)


@router.get("/healthz", operation_id="healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=ReadyResponse,
    responses={
        503: {
            "model": ReadyResponse,
            "description": "Tiers are still loading, none loaded, or the server is draining.",
        }
    },
    summary="Readiness: 503 until the configured tiers are loaded, and while draining",
)
async def readyz(decisions: DecisionsDep) -> Response:
    pool = decisions.gatekeeper.pool
    body = ReadyResponse(ready=pool.ready and not decisions.drain.draining, tiers=pool.statuses())
    return JSONResponse(status_code=200 if body.ready else 503, content=body.model_dump())


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={
        200: {"content": {"text/plain": {}}, "description": "Prometheus text format."},
        **_UNAUTHORIZED,
    },
    dependencies=[Depends(metrics_access)],
    summary="Prometheus metrics (open, or behind auth.metrics_key_sha256)",
)
async def metrics(gatekeeper: GatekeeperDep) -> Response:
    return Response(generate_latest(gatekeeper.metrics.registry), media_type=CONTENT_TYPE_LATEST)
