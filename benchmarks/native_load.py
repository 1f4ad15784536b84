"""Light load generators written in C, driven from Python: ``wrk`` for REST, ``h2load`` for gRPC.

The load generator shares the machine's cores with the server, so it must cost as little as
possible and the same on both sides: ``wrk`` (HTTP/1.1 keep-alive) and ``h2load`` (nghttp2's
HTTP/2 benchmark: a gRPC call is an HTTP/2 POST of a length-prefixed protobuf message) are both
single-threaded C clients sending one pre-encoded request over and over. Install them with
``apt-get install wrk nghttp2-client``.

``h2load`` does not read gRPC trailers, so the server's own ``gated_requests_total`` counter
(``protocol="grpc", outcome="success"``) is read before and after each window to check that
every call succeeded.
"""

from __future__ import annotations

import os
import re
import shutil
import subprocess
import tempfile
import threading
from dataclasses import dataclass
from http.server import BaseHTTPRequestHandler, ThreadingHTTPServer
from pathlib import Path

import numpy as np

TOOLS = ("wrk", "h2load")
TRACEPARENT = "00-0af7651916cd43dd8448eb211c80319c-b7ad6b7169203331-01"


def missing_tools() -> list[str]:
    return [tool for tool in TOOLS if shutil.which(tool) is None]


@dataclass
class Window:
    requests: int
    errors: int
    seconds: float
    latencies_ms: list[float] | None  # every request (h2load), or None
    p50_ms: float
    p99_ms: float
    server_cpu_ms: float = 0.0  # CPU the server process spent (all threads), set by measure()


def cpu_seconds(pid: int) -> float:
    """User + system CPU time of process ``pid`` so far (every thread)."""
    fields = Path(f"/proc/{pid}/stat").read_text().rsplit(")", 1)[1].split()
    return (int(fields[11]) + int(fields[12])) / os.sysconf("SC_CLK_TCK")


def grpc_frame(x: np.ndarray, model: str) -> bytes:
    """One gRPC message frame of a ModelInferRequest for ``x`` with raw contents."""
    from service.grpc import messages

    request = messages.ModelInferRequest(model_name=model)
    tensor = request.inputs.add(name="input", datatype="FP32")
    tensor.shape.extend(x.shape)
    request.raw_input_contents.append(x.astype("<f4").tobytes())
    payload = request.SerializeToString()
    return b"\x00" + len(payload).to_bytes(4, "big") + payload


_UNITS = {"us": 1e-3, "ms": 1.0, "s": 1e3, "m": 60e3}


def _ms(text: str) -> float:
    value, unit = re.fullmatch(r"([\d.]+)(us|ms|s|m)", text).groups()  # type: ignore[union-attr]
    return float(value) * _UNITS[unit]


def wrk(
    url: str, body: bytes, headers: dict[str, str], concurrency: int, seconds: float
) -> Window:
    """``wrk -t1 -cC -dS --latency`` POSTing ``body``."""
    return wrk_many(url, [(body, headers)], concurrency, seconds)


def wrk_many(
    url: str,
    requests: list[tuple[bytes, dict[str, str]]],
    concurrency: int,
    seconds: float,
    timeout_s: float = 2.0,
) -> Window:
    """``wrk -t1 -cC -dS --latency`` POSTing ``requests`` (each a body and its headers) in
    turn; a request unanswered after ``timeout_s`` counts as an error."""
    with tempfile.TemporaryDirectory() as tmp:
        lines = ["local bodies = {}", "local headers = {}"]
        for i, (body, extra) in enumerate(requests, 1):
            path = Path(tmp) / f"{i}.bin"
            path.write_bytes(body)
            # Each file closed at once: wrk fails to connect once Lua holds several open.
            lines.append(f'do local f = io.open("{path}", "rb"); bodies[{i}] = f:read("*all"); '
                         'f:close() end')
            pairs = ", ".join(f'["{k}"] = "{v}"' for k, v in extra.items())
            lines.append(f"headers[{i}] = {{{pairs}}}")
        lines += ["local n = 0", "request = function()", "  n = n % #bodies + 1",
                  '  return wrk.format("POST", nil, headers[n], bodies[n])', "end"]
        script = Path(tmp) / "post.lua"
        script.write_text("\n".join(lines) + "\n")
        out = subprocess.run(
            ["wrk", "-t1", f"-c{concurrency}", f"-d{max(1, round(seconds))}s", "--latency",
             "--timeout", f"{max(1, round(timeout_s))}s", "-s", str(script), url],
            check=True, capture_output=True, text=True, timeout=seconds + timeout_s + 60,
        ).stdout
    total = re.search(r"(\d+) requests in ([\d.]+)(\w+),", out)
    if total is None:
        raise RuntimeError(f"unexpected wrk output:\n{out}")
    bad = re.search(r"Non-2xx or 3xx responses: (\d+)", out)
    socket_errors = re.search(r"Socket errors: connect (\d+), read (\d+), write (\d+), "
                              r"timeout (\d+)", out)
    errors = (int(bad.group(1)) if bad else 0) + (
        sum(int(g) for g in socket_errors.groups()) if socket_errors else 0
    )
    # wrk pads a value in seconds ("1.19s ") with a space.
    percentiles = dict(re.findall(r"^\s+(50|99)%\s+(\S+)\s*$", out, re.MULTILINE))
    if set(percentiles) != {"50", "99"}:  # nothing finished within the window
        percentiles = {"50": "0ms", "99": "0ms"}
    elapsed = _ms(total.group(2) + total.group(3)) / 1e3
    return Window(
        requests=int(total.group(1)) - errors, errors=errors, seconds=elapsed,
        latencies_ms=None, p50_ms=_ms(percentiles["50"]), p99_ms=_ms(percentiles["99"]),
    )


def h2load(
    url: str, frame: bytes, connections: int, streams: int, seconds: float
) -> Window:
    """``h2load`` with ``connections`` × ``streams`` concurrent gRPC calls for ``seconds``."""
    with tempfile.TemporaryDirectory() as tmp:
        data = Path(tmp) / "frame.bin"
        data.write_bytes(frame)
        log = Path(tmp) / "requests.log"
        out = subprocess.run(
            ["h2load", "-t1", f"-c{connections}", f"-m{streams}",
             f"-D{max(1, round(seconds * 1000))}ms",
             f"--data={data}", "-H", "content-type: application/grpc", "-H", "te: trailers",
             f"--log-file={log}", url],
            check=True, capture_output=True, text=True, timeout=seconds + 60,
        ).stdout
        rows = [line.split("\t") for line in log.read_text().splitlines() if line.strip()]
    done = re.search(r"requests: \d+ total, \d+ started, (\d+) done, (\d+) succeeded, "
                     r"(\d+) failed, (\d+) errored", out)
    finished = re.search(r"finished in ([\d.]+)(\w+),", out)
    if done is None or finished is None:
        raise RuntimeError(f"unexpected h2load output:\n{out}")
    latencies = [int(row[2]) / 1e3 for row in rows if row[1] == "200"]
    lat = np.array(latencies) if latencies else np.zeros(1)
    return Window(
        requests=int(done.group(2)), errors=int(done.group(3)) + int(done.group(4)),
        seconds=_ms(finished.group(1) + finished.group(2)) / 1e3, latencies_ms=latencies,
        p50_ms=float(np.percentile(lat, 50)), p99_ms=float(np.percentile(lat, 99)),
    )


class _Sink(BaseHTTPRequestHandler):
    def do_POST(self) -> None:  # noqa: N802 - the handler protocol's name
        self.rfile.read(int(self.headers.get("content-length", 0)))
        self.send_response(200)
        self.send_header("content-length", "0")
        self.end_headers()

    def log_message(self, *args: object) -> None:
        pass


def span_sink() -> ThreadingHTTPServer:
    """An OTLP/HTTP endpoint on 127.0.0.1 that accepts and drops every export."""
    sink = ThreadingHTTPServer(("127.0.0.1", 0), _Sink)
    threading.Thread(target=sink.serve_forever, daemon=True).start()
    return sink
