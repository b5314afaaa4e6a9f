"""A scripted OpenAI-compatible engine on loopback: it streams the SSE lines a test gives it,
with pauses, wrong status codes or a dropped connection. It speaks real HTTP over a real
socket, so the backend's transport, timeouts and stream handling run as they do in production;
the real-engine tests are in test_openai_server.py."""

from __future__ import annotations

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
    pause_s: float = 0.0  # between events
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

    def handle_error(self, request: Any, client_address: Any) -> None:
        pass  # a client that stops reading early (hook, deadline) is expected here


class _Handler(BaseHTTPRequestHandler):
    protocol_version = "HTTP/1.1"
    server: _Server

    def setup(self) -> None:
        super().setup()
        # small SSE writes must leave at once, as a real engine's do (no Nagle delay)
        self.connection.setsockopt(socket.IPPROTO_TCP, socket.TCP_NODELAY, 1)

    def log_message(self, format: str, *args: Any) -> None:
        pass

    def do_GET(self) -> None:
        body = b'{"object": "list", "data": [{"id": "scripted"}]}'
        self.send_response(200)
        self.send_header("content-type", "application/json")
        self.send_header("content-length", str(len(body)))
        # not kept alive, so that a stopped engine is really gone for the client's pool
        self.send_header("connection", "close")
        self.end_headers()
        self.wfile.write(body)

    def do_POST(self) -> None:
        length = int(self.headers["content-length"])
        self.server.bodies.append(json.loads(self.rfile.read(length)))
        replies = self.server.replies
        reply = replies.pop(0) if len(replies) > 1 else replies[0]
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
        for line in reply.data:
            raw = f"data: {line}\n\n".encode()
            self.wfile.write(b"%x\r\n%s\r\n" % (len(raw), raw))
            self.wfile.flush()
            time.sleep(reply.pause_s)
        time.sleep(reply.hang_s)
        if reply.drop:
            self.close_connection = True
            return
        self.wfile.write(b"0\r\n\r\n")


@contextmanager
def scripted_engine(*replies: Reply) -> Iterator[tuple[str, list[dict[str, Any]]]]:
    """Yield (base URL, the request bodies received) while the engine serves `replies`
    in order (the last one repeats)."""
    server = _Server(("127.0.0.1", 0), _Handler)
    server.replies = list(replies)
    server.bodies = []
    thread = threading.Thread(target=server.serve_forever, daemon=True)
    thread.start()
    try:
        yield f"http://127.0.0.1:{server.server_address[1]}/v1", server.bodies
    finally:
        server.shutdown()
        server.server_close()
