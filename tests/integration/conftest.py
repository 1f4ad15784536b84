"""Real servers for the integration tests: ``gated serve`` in a subprocess on 127.0.0.1.

Each server gets a free port, is polled until ready, and is stopped by the test through its PID
(SIGTERM, then SIGKILL if it hangs). Its log is printed when a test using it fails.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
from collections.abc import Iterator
from dataclasses import dataclass
from pathlib import Path

import httpx
import pytest

from tests.utils.service import ADMIN_TOKEN, make_repository

ROOT = Path(__file__).resolve().parents[2]
START_TIMEOUT_S = 60.0


def free_port() -> int:
    with socket.socket() as sock:
        sock.bind(("127.0.0.1", 0))
        port: int = sock.getsockname()[1]
        return port


@dataclass
class Server:
    process: subprocess.Popen[bytes]
    port: int
    log: Path

    @property
    def url(self) -> str:
        return f"http://127.0.0.1:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"127.0.0.1:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """SIGTERM by PID and wait; SIGKILL if the drain hangs. Returns the exit code."""
        if self.process.poll() is None:
            os.kill(self.process.pid, signal.SIGTERM)
            try:
                self.process.wait(timeout_s)
            except subprocess.TimeoutExpired:
                os.kill(self.process.pid, signal.SIGKILL)
                self.process.wait(10)
        return self.process.returncode


def start_server(
    repository: Path | None, log_dir: Path, wait_ready: bool = True, **settings: object
) -> Server:
    """Start ``gated serve`` with ``settings`` as GATED_* variables; wait until it is ready."""
    port = free_port()
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATED_")}
    env.update({f"GATED_{k.upper()}": str(v) for k, v in settings.items()})
    command = [sys.executable, "-m", "service.cli", "serve", "--host", "127.0.0.1",
               "--port", str(port)]
    if repository is not None:
        command += ["--model-repository", str(repository)]
    log = log_dir / f"server-{port}.log"
    with log.open("wb") as sink:
        process = subprocess.Popen(
            command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=ROOT
        )
    server = Server(process, port, log)
    if wait_ready:
        wait_until_ready(server)
    return server


def wait_until_ready(server: Server) -> None:
    deadline = time.monotonic() + START_TIMEOUT_S
    while time.monotonic() < deadline:
        if server.process.poll() is not None:
            code = server.process.returncode
            raise RuntimeError(f"server exited with {code}:\n{server.output()}")
        try:
            if httpx.get(f"{server.url}/v2/health/ready", timeout=1.0).status_code == 200:
                return
        except httpx.TransportError:
            pass
        time.sleep(0.1)
    server.stop()
    raise RuntimeError(f"server not ready after {START_TIMEOUT_S} s:\n{server.output()}")


@pytest.fixture(scope="session")
def integration_repository(tmp_path_factory: pytest.TempPathFactory) -> Path:
    return make_repository(tmp_path_factory.mktemp("int-repository"), ("tiny",))


@pytest.fixture(scope="module")
def server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """Batched server with an admin token; a 20 ms delay so concurrent requests share batches."""
    srv = start_server(
        integration_repository, tmp_path_factory.mktemp("logs"),
        admin_token=ADMIN_TOKEN, max_batch_size=8, max_queue_delay_ms=20,
    )
    yield srv
    code = srv.stop()
    assert code == 0, srv.output()


@pytest.fixture(scope="module")
def plain_server(
    integration_repository: Path, tmp_path_factory: pytest.TempPathFactory
) -> Iterator[Server]:
    """No admin token, no batching: the naive one-forward-per-request mode."""
    srv = start_server(integration_repository, tmp_path_factory.mktemp("logs"), batching="false")
    yield srv
    assert srv.stop() == 0, srv.output()
