"""Run the app under uvicorn with a graceful drain on SIGTERM: stop accepting, let the requests
in flight finish within `shutdown_grace_s` (the unanswered ones then get fail-closed answers),
run the lifespan shutdown (models closed, decision log flushed), and exit with status 0."""

from __future__ import annotations

import signal
from types import FrameType

import uvicorn
from fastapi import FastAPI

from service.ops.drain import Drain
from service.settings import Settings

# Time, past the drain's grace, for the last fail-closed answers to be written out before
# uvicorn would cancel what is left.
_WRITE_MARGIN_S = 5.0


class DrainingServer(uvicorn.Server):
    def __init__(self, config: uvicorn.Config, drain: Drain) -> None:
        super().__init__(config)
        self.drain = drain

    def handle_exit(self, sig: int, frame: FrameType | None) -> None:
        self.drain.begin()
        super().handle_exit(sig, frame)


def _drained(signum: int, frame: FrameType | None) -> None:
    """uvicorn re-raises the signal it shut down on; after a drain that is a clean exit."""


def serve(app: FastAPI, settings: Settings) -> int:
    drain: Drain = app.state.drain
    config = uvicorn.Config(
        app,
        host=settings.host,
        port=settings.port,
        log_config=None,
        access_log=False,
        timeout_graceful_shutdown=int(settings.shutdown_grace_s + _WRITE_MARGIN_S),
    )
    previous = signal.signal(signal.SIGTERM, _drained)
    try:
        DrainingServer(config, drain).run()
    finally:
        signal.signal(signal.SIGTERM, previous)
    return 0
