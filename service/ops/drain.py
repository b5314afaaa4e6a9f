"""Graceful drain: after SIGTERM the server stops accepting, the requests in flight get
`grace_s` to finish, and whatever is still unanswered then gets a fail-closed answer."""

from __future__ import annotations

import asyncio
import logging
import time
from collections.abc import Awaitable, Callable
from typing import TypeVar

logger = logging.getLogger(__name__)

T = TypeVar("T")


class Drain:
    def __init__(self, grace_s: float) -> None:
        self.grace_s = grace_s
        self.draining = False
        self.began_at: float | None = None
        self._loop: asyncio.AbstractEventLoop | None = None
        self._expired: asyncio.Event | None = None

    def bind(self, loop: asyncio.AbstractEventLoop) -> None:
        """Attach to the serving event loop (from the app's lifespan)."""
        self._loop = loop
        self._expired = asyncio.Event()

    @property
    def expired(self) -> bool:
        return self._expired is not None and self._expired.is_set()

    def begin(self) -> None:
        """Start the drain; safe to call from a signal handler or another thread."""
        if self.draining:
            return
        self.draining = True
        self.began_at = time.monotonic()
        logger.info("draining", extra={"grace_s": self.grace_s})
        if self._loop is not None and not self._loop.is_closed():
            self._loop.call_soon_threadsafe(self._schedule)

    def _schedule(self) -> None:
        assert self._loop is not None and self._expired is not None
        self._loop.call_later(self.grace_s, self._expired.set)

    async def run(self, work: Awaitable[T], cut: Callable[[], T]) -> T:
        """`work`'s result, or `cut()` if the drain's grace runs out first."""
        task = asyncio.ensure_future(work)
        if self._expired is None:
            return await task
        if self._expired.is_set():
            task.cancel()
            return cut()
        expiry = asyncio.ensure_future(self._expired.wait())
        try:
            await asyncio.wait({task, expiry}, return_when=asyncio.FIRST_COMPLETED)
        except asyncio.CancelledError:
            task.cancel()
            raise
        finally:
            expiry.cancel()
        if task.done():
            return task.result()
        task.cancel()
        return cut()
