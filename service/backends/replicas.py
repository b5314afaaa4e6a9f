"""Several replicas of one engine behind one tier: each request goes to the live replica with
the fewest requests in flight; a replica that fails (connection refused or reset, gone
mid-answer) or stalls is ejected, and comes back at its first good health check after
`eject_s`; one that answers 429 or 503 gets no request until its pause is over.

Pure bookkeeping under a lock (the serial path calls it from the tier's worker thread, the
concurrent one from the event loop); the HTTP lives in `service/backends/openai.py`."""

from __future__ import annotations

import threading
import time
from collections.abc import Callable
from dataclasses import dataclass

# (replica URL, event): "ejected:<reason>", "readmitted", "busy"
ReplicaListener = Callable[[str, str], None]
_FAILED_CHECKS = 2  # health checks failed in a row that eject a replica


@dataclass
class Replica:
    url: str  # the API root, e.g. http://gpu-1:8000/v1
    in_flight: int = 0
    live: bool = True
    ejected_at: float = 0.0
    busy_until: float = 0.0
    sent: int = 0  # requests sent so far: ties in flight go to the one sent fewer
    failed_checks: int = 0  # health checks failed in a row

    @property
    def root(self) -> str:
        """The server's root, where /health lives (llama.cpp's server, vLLM)."""
        return self.url[: -len("/v1")] if self.url.endswith("/v1") else self.url


class ReplicaSet:
    def __init__(
        self,
        urls: list[str],
        *,
        eject_s: float = 5.0,
        busy_s: float = 1.0,
        clock: Callable[[], float] = time.monotonic,
    ) -> None:
        if not urls:
            raise ValueError("a replica set needs at least one URL")
        self.replicas = [Replica(u.rstrip("/")) for u in urls]
        self.eject_s = eject_s
        self.busy_s = busy_s
        self.listener: ReplicaListener | None = None
        self._clock = clock
        self._lock = threading.Lock()

    def _notify(self, replica: Replica, event: str) -> None:
        if self.listener is not None:
            self.listener(replica.url, event)

    @property
    def live(self) -> list[Replica]:
        return [r for r in self.replicas if r.live]

    def _open(self, exclude: frozenset[str]) -> list[Replica]:
        now = self._clock()
        return [r for r in self.live if r.busy_until <= now and r.url not in exclude]

    @property
    def all_busy(self) -> bool:
        """Some replica is live and every live one asked for a pause."""
        return bool(self.live) and not self._open(frozenset())

    def next_in_flight(self) -> int:
        """In flight on the replica that `acquire` would choose now, before it is chosen."""
        with self._lock:
            open_ = self._open(frozenset()) or self.live or self.replicas
            return min(r.in_flight for r in open_)

    def acquire(self, exclude: frozenset[str] = frozenset()) -> Replica | None:
        """The open replica with the fewest in flight (counted from now on until `release`);
        None when every live one is busy or excluded, or none is live."""
        with self._lock:
            candidates = self._open(exclude)
            if not candidates:
                return None
            best = min(candidates, key=lambda r: (r.in_flight, r.sent))
            best.in_flight += 1
            best.sent += 1
            return best

    def release(self, replica: Replica) -> None:
        with self._lock:
            replica.in_flight -= 1

    def eject(self, replica: Replica, reason: str, *, last_too: bool = False) -> bool:
        """Take `replica` out of the choice. The last live replica is kept unless `last_too`
        (its health check says so): a tier with one engine then fails per request, as before,
        instead of refusing everything for `eject_s` after a single error."""
        with self._lock:
            if not replica.live or (not last_too and len(self.live) <= 1):
                return False
            replica.live = False
            replica.ejected_at = self._clock()
        self._notify(replica, f"ejected:{reason}")
        return True

    def pause(self, replica: Replica, seconds: float | None) -> None:
        """The replica answered 429/503: no request to it for `seconds` (default busy_s)."""
        with self._lock:
            replica.busy_until = self._clock() + (self.busy_s if seconds is None else seconds)
        self._notify(replica, "busy")

    def health(self, replica: Replica, ok: bool, *, definite: bool = True) -> None:
        """A health check's answer. Two failed in a row eject the replica; the last live one
        only when the failure is `definite` (refused, or an error status), not a timeout: an
        engine too busy to answer its health check in time is still serving. A good answer
        readmits an ejected replica once it has been out for eject_s."""
        if not ok:
            with self._lock:
                replica.failed_checks += 1
                due = replica.failed_checks >= _FAILED_CHECKS
            if due:
                self.eject(replica, "health", last_too=definite)
            return
        with self._lock:
            replica.failed_checks = 0
            if replica.live or self._clock() - replica.ejected_at < self.eject_s:
                return
            replica.live = True
            replica.busy_until = 0.0
        self._notify(replica, "readmitted")
