"""An OpenAI-compatible serving engine over HTTP: vLLM, the llama.cpp server, Ollama,
llama-cpp-python's server, one replica or several. The engine enforces the request's JSON
schema (`response_format`); the answer streams back over SSE so that the token hook (loop
detector, completeness check) and the deadline act on it as they do on a local model.

Two transports with the same rules (deadline, retries, replica choice and ejection):
`agenerate` from the event loop through a pooled `httpx.AsyncClient` per replica, so that a
tier keeps up to `max_concurrency` requests in flight on each engine and the engine batches
them; and `generate`, synchronous, for the serial path (`max_concurrency = 1`) on the tier's
worker thread. Closing a stream (hook, deadline, cancellation) tells the engine to stop."""

from __future__ import annotations

import asyncio
import contextlib
import logging
import math
import threading
import time
from collections.abc import Callable
from typing import Any

import httpx

from service.backends.base import Finish, Generation, GenerationRequest, TokenHook
from service.backends.openai_stream import CHARS_PER_TOKEN, StreamReader, chat_body
from service.backends.replicas import Replica, ReplicaSet
from service.errors import (
    BackendError,
    BackendOverloadedError,
    BackendUnavailableError,
    ReplicaLostError,
)

logger = logging.getLogger(__name__)

_RETRY_STATUS = frozenset({502, 504})  # a proxy in front of an engine that is restarting
_BUSY_STATUS = frozenset({429, 503})  # the engine's own "not now": saturated or loading
_BACKOFF_S = 0.05


class _Retryable(Exception):
    """The replica could not be reached, or a proxy said it is away, before any token."""


class _Busy(Exception):
    def __init__(self, message: str, retry_after_s: float | None) -> None:
        super().__init__(message)
        self.retry_after_s = retry_after_s


def _retry_after(response: httpx.Response) -> float | None:
    try:
        return max(0.0, float(response.headers["retry-after"]))
    except (KeyError, ValueError):
        return None


def _check_status(response: httpx.Response, detail: str) -> None:
    message = f"engine answered {response.status_code}: {detail}"
    if response.status_code in _BUSY_STATUS:
        raise _Busy(message, _retry_after(response))
    if response.status_code in _RETRY_STATUS:
        raise _Retryable(message)
    raise BackendError(message)


class OpenAICompatibleBackend:
    engine = "openai"

    def __init__(
        self,
        model: str,
        base_url: str | list[str],
        *,
        api_key: str | None = None,
        context_size: int = 4096,
        connect_timeout_s: float = 2.0,
        max_retries: int = 2,
        response_format: str = "json_schema",
        top_logprobs: int = 0,
        max_concurrency: int = 1,
        health_interval_s: float = 2.0,
        eject_s: float = 5.0,
        busy_s: float = 1.0,
    ) -> None:
        self.model = model
        urls = [base_url] if isinstance(base_url, str) else list(base_url)
        self.replicas = ReplicaSet(urls, eject_s=eject_s, busy_s=busy_s)
        self._headers = {"authorization": f"Bearer {api_key}"} if api_key else {}
        self._context_size = context_size
        self._connect_timeout_s = connect_timeout_s
        self._max_retries = max_retries
        self._response_format = response_format
        self._top_logprobs = top_logprobs
        self._max_concurrency = max_concurrency
        self._health_interval_s = health_interval_s
        self._clients: dict[str, httpx.Client] = {}
        self._aclients: dict[str, httpx.AsyncClient] = {}
        self._watcher: asyncio.Task[None] | None = None

    @property
    def context_size(self) -> int:
        return self._context_size

    @property
    def max_concurrency(self) -> int:
        return self._max_concurrency

    @property
    def capacity(self) -> int:
        return self._max_concurrency * len(self.replicas.live)

    @property
    def busy(self) -> bool:
        return self.replicas.all_busy

    def next_concurrency(self) -> int:
        return self.replicas.next_in_flight() + 1

    def _limits(self) -> httpx.Limits:
        # one connection per request in flight, and one for the health check
        return httpx.Limits(
            max_connections=self._max_concurrency + 1,
            max_keepalive_connections=self._max_concurrency + 1,
        )

    def load(self) -> None:
        """Synchronous clients, and each replica's /models: a replica that does not answer
        starts ejected; none answering is an error."""
        errors = []
        for replica in self.replicas.replicas:
            client = httpx.Client(
                base_url=replica.url, headers=self._headers, limits=self._limits()
            )
            self._clients[replica.url] = client
            try:
                response = client.get("/models", timeout=self._connect_timeout_s + 3.0)
                if response.status_code >= 400:
                    raise BackendError(f"answered {response.status_code} to /models")
            except (httpx.HTTPError, BackendError) as exc:
                detail = exc.message if isinstance(exc, BackendError) else repr(exc)
                errors.append(f"{replica.url}: {detail}")
                self.replicas.eject(replica, "load", last_too=True)
        if not self.replicas.live:
            self.close()
            raise BackendError(f"cannot reach the engine at {'; '.join(errors)}")
        for error in errors:
            logger.warning("replica not ready at start: %s", error)
        logger.info(
            "serving %s from %d engine replica(s), %d in flight each",
            self.model,
            len(self.replicas.live),
            self._max_concurrency,
        )

    async def start(self, on_replica_event: Callable[[str, str], None] | None = None) -> None:
        self.replicas.listener = on_replica_event
        for replica in self.replicas.replicas:
            if on_replica_event is not None:
                on_replica_event(replica.url, f"state:{'up' if replica.live else 'down'}")
            self._aclients[replica.url] = httpx.AsyncClient(
                base_url=replica.url, headers=self._headers, limits=self._limits()
            )
        self._watcher = asyncio.create_task(self._watch(), name=f"health:{self.model}")

    def count_tokens(self, text: str) -> int:
        return math.ceil(len(text) / CHARS_PER_TOKEN)

    def _body(self, request: GenerationRequest) -> dict[str, Any]:
        return chat_body(self.model, request, self._response_format, self._top_logprobs)

    def _timeout(self, deadline: float) -> httpx.Timeout:
        left = max(deadline - time.monotonic(), 0.001)
        return httpx.Timeout(left, connect=min(self._connect_timeout_s, left))

    # ---- replica choice and retries, the same for both transports ----------------------
    def _choose(self, tried: frozenset[str]) -> Replica:
        replica = self.replicas.acquire(tried) or self.replicas.acquire()
        if replica is not None:
            return replica
        if self.replicas.all_busy:
            raise BackendOverloadedError("every engine replica is saturated (429/503)")
        raise BackendUnavailableError("no engine replica is live")

    def _after_failure(
        self, replica: Replica, exc: Exception, attempt: int, deadline: float
    ) -> float:
        """Book a failed try; the pause before the next one, or raise when it is the last."""
        if isinstance(exc, _Busy):
            self.replicas.pause(replica, exc.retry_after_s)
            if self.replicas.all_busy:
                raise BackendOverloadedError(f"engine saturated: {exc}") from exc
            return 0.0  # another replica is open: at once, no retry spent
        ejected = self.replicas.eject(replica, "unreachable")
        pause = 0.0 if ejected else _BACKOFF_S * 2 ** (attempt - 1)
        if attempt > self._max_retries or time.monotonic() + pause >= deadline:
            raise BackendError(f"engine unavailable: {exc}") from exc
        logger.warning("engine replica %s unavailable (%s); retry %d", replica.url, exc, attempt)
        return pause

    def _lost(self, replica: Replica, exc: httpx.HTTPError) -> ReplicaLostError:
        self.replicas.eject(replica, "lost")
        return ReplicaLostError(f"the engine went away mid-answer: {exc!r}")

    def _stalled(self, replica: Replica, reader: StreamReader, answered: bool) -> None:
        """The deadline passed: a replica that had not even answered the request is stalled
        (when another one is live, it is ejected until its health check answers again)."""
        reader.state.finish = Finish.DEADLINE
        if not answered and self.replicas.eject(replica, "stalled"):
            logger.warning("engine replica %s stalled; ejected", replica.url)

    # ---- the serial path --------------------------------------------------------------
    def generate(self, request: GenerationRequest, on_token: TokenHook | None = None) -> Generation:
        if not self._clients:
            raise BackendError(f"model {self.model} is not loaded")
        body = self._body(request)
        attempt, tried = 0, frozenset[str]()
        while True:
            replica = self._choose(tried)
            try:
                return self._stream(replica, body, request, on_token)
            except (_Retryable, _Busy) as exc:
                attempt += 0 if isinstance(exc, _Busy) else 1
                pause = self._after_failure(replica, exc, attempt, request.deadline)
                tried |= {replica.url}
            finally:
                self.replicas.release(replica)
            time.sleep(pause)

    def _stream(
        self,
        replica: Replica,
        body: dict[str, Any],
        request: GenerationRequest,
        on_token: TokenHook | None,
    ) -> Generation:
        concurrency, start = replica.in_flight, time.monotonic()
        reader = StreamReader(request, on_token)
        if start >= request.deadline:
            return Generation(text="", finish=Finish.DEADLINE)
        answered = False
        try:
            with self._clients[replica.url].stream(
                "POST", "/chat/completions", json=body, timeout=self._timeout(request.deadline)
            ) as response:
                answered = True
                if response.status_code >= 400:
                    _check_status(response, response.read().decode("utf-8", "replace")[:300])
                # A stalled engine must not hold the tier past the deadline: the read timeout
                # was fixed when the request left, so a watchdog closes the stream at the
                # deadline whatever the socket is doing.
                watchdog = threading.Timer(
                    max(request.deadline - time.monotonic(), 0.0), response.close
                )
                watchdog.daemon = True
                watchdog.start()
                try:
                    for line in response.iter_lines():
                        if reader.line(line):
                            break
                finally:
                    watchdog.cancel()
        except httpx.HTTPError as exc:
            self._transport_error(replica, reader, exc, answered)
        return self._finished(replica, reader, body, start, concurrency)

    def _transport_error(
        self, replica: Replica, reader: StreamReader, exc: httpx.HTTPError, answered: bool
    ) -> None:
        if time.monotonic() >= reader.request.deadline:
            # past the deadline, whatever broke the stream was the deadline
            self._stalled(replica, reader, answered)
        elif isinstance(exc, httpx.TransportError) and reader.state.count == 0:
            raise _Retryable(repr(exc)) from exc  # nothing was generated: safe to resend
        else:
            raise self._lost(replica, exc) from exc

    # ---- the concurrent path ----------------------------------------------------------
    async def agenerate(
        self, request: GenerationRequest, on_token: TokenHook | None = None
    ) -> Generation:
        if not self._aclients:
            raise BackendError(f"model {self.model} is not started on the event loop")
        body = self._body(request)
        attempt, tried = 0, frozenset[str]()
        while True:
            replica = self._choose(tried)
            try:
                return await self._astream(replica, body, request, on_token)
            except (_Retryable, _Busy) as exc:
                attempt += 0 if isinstance(exc, _Busy) else 1
                pause = self._after_failure(replica, exc, attempt, request.deadline)
                tried |= {replica.url}
            finally:
                self.replicas.release(replica)
            await asyncio.sleep(pause)

    async def _astream(
        self,
        replica: Replica,
        body: dict[str, Any],
        request: GenerationRequest,
        on_token: TokenHook | None,
    ) -> Generation:
        concurrency, start = replica.in_flight, time.monotonic()
        reader = StreamReader(request, on_token)
        if start >= request.deadline:
            return Generation(text="", finish=Finish.DEADLINE)
        answered = False
        try:
            async with asyncio.timeout(request.deadline - start):
                async with self._aclients[replica.url].stream(
                    "POST",
                    "/chat/completions",
                    json=body,
                    timeout=self._timeout(request.deadline),
                ) as response:
                    answered = True
                    if response.status_code >= 400:
                        detail = (await response.aread()).decode("utf-8", "replace")[:300]
                        _check_status(response, detail)
                    async for line in response.aiter_lines():
                        if reader.line(line):
                            break
        except TimeoutError:
            self._stalled(replica, reader, answered)
        except httpx.HTTPError as exc:
            self._transport_error(replica, reader, exc, answered)
        return self._finished(replica, reader, body, start, concurrency)

    def _finished(
        self,
        replica: Replica,
        reader: StreamReader,
        body: dict[str, Any],
        start: float,
        concurrency: int,
    ) -> Generation:
        """The answer, unless the engine cut it short: then it is resent like one from a lost
        replica (with a fresh loop detector), not verified as if the model had stopped there.
        The replica stays in: it answered, it only dropped this stream."""
        if reader.cut_short:
            logger.warning("engine replica %s ended an answer with no finish reason", replica.url)
            raise ReplicaLostError(
                f"the engine ended the answer after {reader.state.count} pieces with no finish "
                "reason (llama-cpp-python's server: run it with --interrupt_requests False)"
            )
        return reader.generation(body, start, concurrency=concurrency)

    # ---- health -----------------------------------------------------------------------
    async def check(self, replica: Replica) -> tuple[bool, bool]:
        """The engine's own /health (llama.cpp's server, vLLM), else /v1/models: (healthy,
        definite), where a timeout is not definite (a busy engine may answer late)."""
        client = self._aclients[replica.url]
        timeout = self._connect_timeout_s + 1.0
        try:
            response = await client.get(f"{replica.root}/health", timeout=timeout)
            if response.status_code == 404:
                response = await client.get("/models", timeout=timeout)
        except httpx.TimeoutException:
            return False, False
        except httpx.HTTPError:
            return False, True
        return response.status_code == 200, True

    async def _watch(self) -> None:
        while True:
            await asyncio.sleep(self._health_interval_s)
            # A replica streaming an answer shows it is up; it is not polled, because a poll can
            # break that stream (llama-cpp-python's server drops a stream when any other request
            # arrives). A stream that fails or stalls ejects its replica on its own.
            idle = [r for r in self.replicas.replicas if r.in_flight == 0]
            results = await asyncio.gather(*(self.check(r) for r in idle))
            for replica, (ok, definite) in zip(idle, results, strict=True):
                self.replicas.health(replica, ok, definite=definite)

    def health(self) -> bool:
        return bool(self._clients) and bool(self.replicas.live)

    async def aclose(self) -> None:
        if self._watcher is not None:
            self._watcher.cancel()
            with contextlib.suppress(asyncio.CancelledError):
                await self._watcher
            self._watcher = None
        clients, self._aclients = self._aclients, {}
        for client in clients.values():
            await client.aclose()

    def close(self) -> None:
        clients, self._clients = self._clients, {}
        for client in clients.values():
            client.close()
