"""``gated serve`` as a child process on 127.0.0.1: a free port, a wait for readiness, a stop
by PID.

The integration tests and the load benchmarks need real servers with their own settings
(``GATED_*`` variables) and must never leave one running: SIGTERM first (the server drains and
exits 0), SIGKILL only when that hangs. Standard library only: the package needs nothing more
for it.
"""

from __future__ import annotations

import os
import signal
import socket
import subprocess
import sys
import time
import urllib.request
from collections.abc import Mapping, Sequence
from dataclasses import dataclass
from pathlib import Path

HOST = "127.0.0.1"


def free_port() -> int:
    """A TCP port of 127.0.0.1 that nothing listens on right now."""
    with socket.socket() as sock:
        sock.bind((HOST, 0))
        port: int = sock.getsockname()[1]
        return port


def stop_process(process: subprocess.Popen[bytes], timeout_s: float = 30.0) -> int:
    """SIGTERM by PID and wait; SIGKILL if it does not exit in time. Returns the exit code."""
    if process.poll() is None:
        os.kill(process.pid, signal.SIGTERM)
        try:
            process.wait(timeout_s)
        except subprocess.TimeoutExpired:
            os.kill(process.pid, signal.SIGKILL)
            process.wait(10)
    return process.returncode


@dataclass
class LocalServer:
    process: subprocess.Popen[bytes]
    port: int
    log: Path
    grpc_port: int = 0  # 0: gRPC off

    @property
    def grpc_address(self) -> str:
        """host:port of the gRPC front end, as tritonclient.grpc wants it."""
        return f"{HOST}:{self.grpc_port}"

    @property
    def url(self) -> str:
        return f"http://{HOST}:{self.port}"

    @property
    def address(self) -> str:
        """host:port, as tritonclient wants it."""
        return f"{HOST}:{self.port}"

    def output(self) -> str:
        return self.log.read_text(errors="replace")

    def stop(self, timeout_s: float = 30.0) -> int:
        """Stop by PID (SIGTERM, then SIGKILL if the drain hangs); the exit code."""
        return stop_process(self.process, timeout_s)

    def wait_ready(self, timeout_s: float = 60.0) -> None:
        """Poll ``/v2/health/ready`` until 200; on exit or timeout raise with the server's log
        (and stop it)."""
        deadline = time.monotonic() + timeout_s
        while time.monotonic() < deadline:
            if self.process.poll() is not None:
                code = self.process.returncode
                raise RuntimeError(f"server exited with {code}:\n{self.output()}")
            try:
                with urllib.request.urlopen(f"{self.url}/v2/health/ready", timeout=1.0) as reply:
                    if reply.status == 200:
                        return
            except OSError:  # refused while starting, or 503 (HTTPError) while warming up
                pass
            time.sleep(0.1)
        self.stop()
        raise RuntimeError(f"server not ready after {timeout_s:g} s:\n{self.output()}")


def start_server(
    repository: Path | None,
    log: Path,
    settings: Mapping[str, object] | None = None,
    *,
    cwd: Path | None = None,
    ready_timeout_s: float | None = 60.0,
    launcher: Sequence[str] | None = None,
) -> LocalServer:
    """Start ``gated serve`` on a free port of 127.0.0.1 with ``settings`` as ``GATED_*``
    variables (the caller's own ``GATED_*`` variables are dropped), its output in ``log``.

    The gRPC front end gets a free port of its own unless ``settings`` name ``grpc_port``
    (0: off; None: not set at all, for a server that predates the setting). Waits for
    readiness unless ``ready_timeout_s`` is None. ``launcher`` replaces ``python -m service.cli``
    (benchmarks start a variant of the server that way); ``serve`` and its flags follow it.
    """
    port = free_port()
    chosen = dict(settings or {})
    grpc_port = int(str(chosen.setdefault("grpc_port", free_port()) or 0))
    if chosen["grpc_port"] is None:
        del chosen["grpc_port"]
    env = {k: v for k, v in os.environ.items() if not k.startswith("GATED_")}
    env.update({f"GATED_{k.upper()}": str(v) for k, v in chosen.items()})
    program = list(launcher) if launcher is not None else [sys.executable, "-m", "service.cli"]
    command = [*program, "serve", "--host", HOST, "--port", str(port)]
    if repository is not None:
        command += ["--model-repository", str(repository)]
    with log.open("wb") as sink:
        process = subprocess.Popen(command, stdout=sink, stderr=subprocess.STDOUT, env=env, cwd=cwd)
    server = LocalServer(process, port, log, grpc_port)
    if ready_timeout_s is not None:
        server.wait_ready(ready_timeout_s)
    return server
