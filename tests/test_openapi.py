from __future__ import annotations

from pathlib import Path

import yaml

from service.openapi import export_openapi

ROOT = Path(__file__).resolve().parents[1]


def test_committed_openapi_matches_the_app() -> None:
    committed = (ROOT / "openapi.yaml").read_text("utf-8")
    assert yaml.safe_load(committed) == yaml.safe_load(export_openapi()), (
        "openapi.yaml has drifted from the code: run `gatekeeper openapi -o openapi.yaml`"
    )


def test_every_route_declares_the_error_shape() -> None:
    doc = yaml.safe_load(export_openapi())
    evaluate = doc["paths"]["/evaluate"]["post"]
    for status in ("400", "413", "422", "500"):
        ref = evaluate["responses"][status]["content"]["application/json"]["schema"]["$ref"]
        assert ref.endswith("/ErrorResponse")
    assert {op["operationId"] for path in doc["paths"].values() for op in path.values()} == {
        "evaluate",
        "healthz",
        "readyz",
        "metrics",
    }
