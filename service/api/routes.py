"""Thin HTTP routes: parse, hand to the pipeline, shape the answer."""

from __future__ import annotations

from typing import Annotated, Any

from fastapi import APIRouter, Depends, Request, Response
from fastapi.responses import JSONResponse
from prometheus_client import CONTENT_TYPE_LATEST, generate_latest

from service.pipeline import Gatekeeper
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

_ERRORS: dict[int | str, dict[str, Any]] = {
    400: {"model": ErrorResponse, "description": "Unknown tier or policy."},
    413: {"model": ErrorResponse, "description": "Body over the configured limit."},
    422: {"model": ErrorResponse, "description": "The body breaks the schema."},
    500: {"model": ErrorResponse, "description": "An internal error."},
}

router = APIRouter()


@router.post(
    "/evaluate",
    operation_id="evaluate",
    response_model=EvaluateResponse,
    responses=_ERRORS,
    summary="Judge a proposed agent action",
)
async def evaluate(body: EvaluateRequest, gatekeeper: GatekeeperDep) -> EvaluateResponse:
    return await gatekeeper.evaluate(body)


@router.get("/healthz", operation_id="healthz", response_model=HealthResponse, summary="Liveness")
async def healthz() -> HealthResponse:
    return HealthResponse(status="ok")


@router.get(
    "/readyz",
    operation_id="readyz",
    response_model=ReadyResponse,
    responses={
        503: {"model": ReadyResponse, "description": "Tiers are still loading or none loaded."}
    },
    summary="Readiness: 503 until the configured tiers are loaded",
)
async def readyz(gatekeeper: GatekeeperDep) -> Response:
    pool = gatekeeper.pool
    body = ReadyResponse(ready=pool.ready, tiers=pool.statuses())
    return JSONResponse(status_code=200 if body.ready else 503, content=body.model_dump())


@router.get(
    "/metrics",
    operation_id="metrics",
    response_class=Response,
    responses={200: {"content": {"text/plain": {}}, "description": "Prometheus text format."}},
    summary="Prometheus metrics",
)
async def metrics(gatekeeper: GatekeeperDep) -> Response:
    return Response(generate_latest(gatekeeper.metrics.registry), media_type=CONTENT_TYPE_LATEST)
