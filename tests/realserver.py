"""Start real servers (the service, or llama-cpp-python's OpenAI-compatible engine) as
separate processes on loopback, for the real-model tests and the benchmarks."""

from __future__ import annotations

import os
import shutil
import signal
import socket
import subprocess
import sys
import tempfile
import threading
import time
from collections.abc import Iterator
from contextlib import contextmanager
from pathlib import Path

import httpx

ROOT = Path(__file__).resolve().parents[1]


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        return int(sock.getsockname()[1])


@contextmanager
def server_process(
    command: list[str], ready_url: str, *, env: dict[str, str] | None = None, ready_timeout: float
) -> Iterator[subprocess.Popen[bytes]]:
    """Run `command` until the block ends; yield once `ready_url` answers 200. Its output goes
    to a file, not a pipe: a chatty engine would fill a pipe nobody reads and stall."""
    with tempfile.TemporaryFile() as log:
        proc = subprocess.Popen(
            command,
            cwd=ROOT,
            env={**os.environ, **(env or {})},
            stdout=log,
            stderr=subprocess.STDOUT,
        )
        try:
            deadline = time.monotonic() + ready_timeout
            while True:
                if proc.poll() is not None:
                    log.seek(0)
                    out = log.read().decode(errors="replace")[-4000:]
                    raise RuntimeError(f"server exited with {proc.returncode}:\n{out}")
                try:
                    if httpx.get(ready_url, timeout=2).status_code == 200:
                        break
                except httpx.TransportError:
                    pass
                if time.monotonic() > deadline:
                    raise RuntimeError("server not ready in time")
                time.sleep(0.2)
            yield proc
        finally:
            if proc.poll() is None:
                proc.send_signal(signal.SIGTERM)
                try:
                    proc.wait(timeout=30)
                except subprocess.TimeoutExpired:
                    proc.kill()
                    proc.wait()


@contextmanager
def gatekeeper_server(
    env: dict[str, str], *, ready_timeout: float = 180.0
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    port = free_port()
    url = f"http://127.0.0.1:{port}"
    command = [sys.executable, "-m", "service", "serve", "--host", "127.0.0.1", "--port", str(port)]
    # a decision log of its own unless the test names one: never the user's state folder
    with (
        tempfile.TemporaryDirectory(prefix="gatekeeper-test-") as scratch,
        server_process(
            command,
            f"{url}/readyz",
            env={
                "GATEKEEPER_LOG_FORMAT": "json",
                "GATEKEEPER_AUDIT__PATH": os.path.join(scratch, "decisions.db"),
                **env,
            },
            ready_timeout=ready_timeout,
        ) as proc,
    ):
        yield url, proc


@contextmanager
def llama_cpp_server(
    model_path: Path,
    *,
    alias: str,
    n_ctx: int = 2048,
    ready_timeout: float = 120.0,
    extra: tuple[str, ...] = (),
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """llama-cpp-python's OpenAI-compatible server on loopback (with `extra` command-line
    settings); yields its /v1 URL."""
    port = free_port()
    command = [
        sys.executable, "-m", "llama_cpp.server", "--model", str(model_path),
        "--model_alias", alias, "--host", "127.0.0.1", "--port", str(port),
        "--n_ctx", str(n_ctx), "--n_threads", "2", *extra,
    ]  # fmt: skip
    url = f"http://127.0.0.1:{port}/v1"
    with server_process(command, f"{url}/models", ready_timeout=ready_timeout) as proc:
        yield url, proc


LLAMA_SERVER_ENV = "GATEKEEPER_LLAMA_SERVER"  # a llama-server binary to use instead


def llama_server_binary() -> Path | None:
    """llama.cpp's own server: $GATEKEEPER_LLAMA_SERVER, else `llama-server` on PATH, else the
    one scripts/llama-server.sh built into its cache (scripts/test.sh builds it)."""
    named = os.environ.get(LLAMA_SERVER_ENV)
    if named:
        return Path(named) if Path(named).is_file() else None
    on_path = shutil.which("llama-server")
    if on_path:
        return Path(on_path)
    # the script knows its cache folder (keyed by version and compile flags)
    where = subprocess.run(
        ["bash", str(ROOT / "scripts" / "llama-server.sh"), "--where"],
        capture_output=True,
        text=True,
        check=True,
    )
    built = Path(where.stdout.strip())
    return built if built.is_file() else None


@contextmanager
def llama_server(
    binary: Path,
    model_path: Path,
    *,
    alias: str,
    parallel: int,
    n_ctx_per_slot: int = 2048,
    threads: int = 2,
    ready_timeout: float = 120.0,
) -> Iterator[tuple[str, subprocess.Popen[bytes]]]:
    """llama.cpp's server with `parallel` slots (continuous batching) on loopback, its slot
    and Prometheus endpoints on; yields its /v1 URL once /health answers 200."""
    port = free_port()
    command = [
        str(binary), "--model", str(model_path), "--alias", alias,
        "--host", "127.0.0.1", "--port", str(port), "--threads", str(threads),
        "--parallel", str(parallel), "--ctx-size", str(parallel * n_ctx_per_slot),
        "--metrics", "--slots", "--no-webui",
    ]  # fmt: skip
    root = f"http://127.0.0.1:{port}"
    # OpenMP threads that spin while they wait stall each other when the cores are shared
    # with other work (measured here: 0.2 tokens/s spinning, 14-16 passive)
    env = {"OMP_WAIT_POLICY": "passive"}
    with server_process(command, f"{root}/health", env=env, ready_timeout=ready_timeout) as proc:
        yield f"{root}/v1", proc


class SlotWatch:
    """Polls an engine's /slots (llama.cpp's server) at 50 Hz and keeps the most slots it saw
    processing at once: the engine's own account of how many requests it served together."""

    def __init__(self, v1_url: str) -> None:
        self._url = v1_url.removesuffix("/v1") + "/slots"
        self.peak = 0
        self._stop = threading.Event()
        self._thread = threading.Thread(target=self._run, daemon=True)

    def _run(self) -> None:
        with httpx.Client(timeout=2) as client:
            while not self._stop.wait(0.02):
                try:
                    slots = client.get(self._url).json()
                except (httpx.HTTPError, ValueError):
                    continue  # an engine that is being killed
                self.peak = max(self.peak, sum(1 for s in slots if s.get("is_processing")))

    def __enter__(self) -> SlotWatch:
        self._thread.start()
        return self

    def __exit__(self, *_exc: object) -> None:
        self._stop.set()
        self._thread.join()
