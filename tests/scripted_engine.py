"""A scripted OpenAI-compatible engine on loopback: it streams the SSE lines a test gives it,
with pauses, wrong status codes or a dropped connection. It speaks real HTTP over a real
socket, so the backend's transport, timeouts and stream handling run as they do in production;
the real-engine tests are in test_openai_server.py."""

from __future__ import annotations

import contextlib
import json
import socket
import socketserver
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from dataclasses import dataclass, field
from http.server import BaseHTTPRequestHandler, HTTPServer
from typing import Any


@dataclass
class Reply:
    """One answer to POST /chat/completions: SSE data lines, or a status with a body."""

    data: list[str] = field(default_factory=list)  # each becomes `data: <line>`
    status: int = 200
    body: str = ""
    pause_s: float = 0.0  # between events (none after the last)
    hang_s: float = 0.0  # after the last event, before closing
    drop: bool = False  # close the socket without finishing the chunked body


def content_events(pieces: list[str], finish: str | None = "stop") -> list[str]:
    events = [json.dumps({"choices": [{"index": 0, "delta": {"content": p}}]}) for p in pieces]
    if finish:
        events.append(json.dumps({"choices": [{"index": 0, "delta": {}, "finish_reason": finish}]}))
    events.append("[DONE]")
    return events


class _Server(socketserver.ThreadingMixIn, HTTPServer):
    daemon_threads = True
    replies: list[Reply]
    bodies: list[dict[str, Any]]
    healthy: bool = True  # what GET /health answers: 200, else 503
    active: int = 0  # completions being streamed now
    polls_while_streaming: int = 0  # GETs (health checks) that arrived while one was streamed
    peak: int = 0  # the most streamed at once
    lock: threading.Lock
    connections: list[socket.socket]

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stops reading early (hook, deadline) is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # small SSE writes must leave at once, as a real engine's do (no Nagle delay)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)
        with self.server.lock:
            self.server.connections.append(self.connection)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        with self.server.lock:
            self.server.polls_while_streaming += self.server.active > 0
        body = b'{"object": "list", "data": [{"id": "scripted"}]}'
        self.send_response(200 if self.server.healthy else 503)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        # not kept alive, so that a stopped engine is really gone for the client's pool
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        server = self.server
        with server.lock:
            server.bodies.append(json.loads(self.rfile.read(length)))
            replies = server.replies
            reply = replies.pop(0) if len(replies) > 1 else replies[0]
            server.active += 1
            server.peak = max(server.peak, server.active)
        self._counted = True
        try:
            self._answer(reply)
        finally:
            self._done()

    def _done(self) -> None:
        """No longer streaming: counted off before the last event leaves, so that a client
        that sends its next request on reading it never finds this one still counted."""
        if self._counted:
            self._counted = False
            with self.server.lock:
                self.server.active -= 1

    def _answer(self, reply: Reply) -> None:
        if reply.status != 200:
            raw = reply.body.encode()
            self.send_response(reply.status)
            self.send_header("content-length", str(len(raw)))
            self.end_headers()
            self.wfile.write(raw)
            return
        self.send_response(200)
        self.send_header("content-type", "text/event-stream")
        self.send_header("transfer-encoding", "chunked")
        self.end_headers()
        for index, line in enumerate(reply.data):
            if index:
                time.sleep(reply.pause_s)
            if index == len(reply.data) - 1 and not reply.hang_s and not reply.drop:
                self._done()
            raw = f"data: {line}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()
        time.sleep(reply.hang_s)
        if reply.drop:
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")


class ScriptedEngine:
    """A running scripted engine: its URL, what it received, how many it streamed at once;
    `stop` takes it away (connections refused from then on)."""

    def __init__(self, replies: tuple[Reply, ...]) -> None:
        self._server = _Server(("127.0.0.1", 0), _Handler)
        self._server.replies = list(replies)
        self._server.bodies = []
        self._server.lock = threading.Lock()
        self._server.connections = []
        self.url = f"http://127.0.0.1:{self._server.server_address[1]}/v1"
        self._thread = threading.Thread(target=self._server.serve_forever, daemon=True)
        self._thread.start()
        self._stopped = False

    @property
    def bodies(self) -> list[dict[str, Any]]:
        return self._server.bodies

    @property
    def peak(self) -> int:
        return self._server.peak

    @property
    def polls_while_streaming(self) -> int:
        return self._server.polls_while_streaming

    def set_healthy(self, healthy: bool) -> None:
        self._server.healthy = healthy

    def stop(self) -> None:
        if not self._stopped:
            self._stopped = True
            self._server.shutdown()
            self._server.server_close()
            # kept-alive connections too: a stopped engine is gone for its clients' pools
            with self._server.lock:
                for connection in self._server.connections:
                    with contextlib.suppress(OSError):
                        connection.shutdown(socket.SHUT_RDWR)


@contextmanager
def scripted_engines(*replies: Reply, count: int = 1) -> Iterator[list[ScriptedEngine]]:
    """`count` engines, each serving `replies` in order (the last one repeats)."""
    engines = [ScriptedEngine(replies) for _ in range(count)]
    try:
        yield engines
    finally:
        for engine in engines:
            engine.stop()


@contextmanager
def scripted_engine(*replies: Reply) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yield (base URL, the request bodies received) while the engine serves `replies`
    in order (the last one repeats)."""
    with scripted_engines(*replies) as (engine,):
        yield engine.url, engine.bodies
