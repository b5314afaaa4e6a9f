"""Export the OpenAPI document; tests compare it with the committed openapi.yaml."""

from __future__ import annotations

import yaml  # type: ignore[import-untyped]

from service.app import create_app
from service.settings import Settings


def export_openapi() -> str:
    # An empty tier table: the document does not depend on the machine's models.
    app = create_app(Settings(tiers={}, models={}, default_tier="edge"))
    text: str = yaml.safe_dump(app.openapi(), sort_keys=False, allow_unicode=True)
    return text
