"""What the HTTP connection limits cost: the server with its guarded httptools protocol against
the same server with uvicorn's plain httptools protocol, interleaved.

Usage::

    .venv/bin/python benchmarks/http_guard.py            # c1, c8, c32; 4 rounds of 4 s each

Both servers run the same code and the shipped model on 127.0.0.1; the plain one is started
through a launcher that swaps ``service.app.http_protocol`` for uvicorn's ``"httptools"`` (that
is the only difference). ``wrk`` (one C thread) POSTs one binary V2 request over keep-alive
connections; rounds alternate which server goes first. Written to
``benchmarks/results/http_guard_<device>.{json,md}``.
"""

from __future__ import annotations

import argparse
import json
import logging
import os
import platform
import sys
import tempfile
import time
from pathlib import Path
from typing import Any

import numpy as np
import orjson
from common import MODEL, RESULTS, ROOT, shipped_repository
from native_load import cpu_seconds, missing_tools, wrk

from service.local import LocalServer, start_server

logger = logging.getLogger("http_guard")

PLAIN = (
    "import sys, service.app as app; app.http_protocol = lambda settings: 'httptools'; "
    "from service.cli import main; sys.exit(main(sys.argv[1:]))"
)


def _request() -> tuple[bytes, dict[str, str]]:
    x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    header = orjson.dumps({
        "inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32",
                    "parameters": {"binary_data_size": x.nbytes}}],
        "parameters": {"binary_data_output": True},
    })
    return header + x.tobytes(), {"Inference-Header-Content-Length": str(len(header)),
                                  "Content-Type": "application/octet-stream"}


def _start(repository: Path, log: Path, plain: bool) -> LocalServer:
    settings = {"log_level": "warning", "device": "cpu", "grpc_port": 0}
    launcher = [sys.executable, "-c", PLAIN] if plain else None
    return start_server(repository, log, settings, cwd=ROOT, ready_timeout_s=120,
                        launcher=launcher)


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--seconds", type=float, default=4.0)
    parser.add_argument("--rounds", type=int, default=4)
    parser.add_argument("--out", type=Path, default=RESULTS)
    args = parser.parse_args(argv)
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    if missing_tools():
        logger.error("needs %s (apt-get install wrk nghttp2-client)", ", ".join(missing_tools()))
        return 2
    body, headers = _request()
    rows: list[dict[str, Any]] = []
    with tempfile.TemporaryDirectory() as tmp:
        repository, source = shipped_repository(Path(tmp))
        servers = {
            "guarded": _start(repository, Path(tmp) / "guarded.log", plain=False),
            "plain httptools": _start(repository, Path(tmp) / "plain.log", plain=True),
        }
        try:
            for concurrency in (1, 8, 32):
                totals = {name: [0, 0.0, 0.0] for name in servers}  # requests, s, cpu s
                for r in range(args.rounds):
                    order = list(servers.items())
                    for name, server in order if r % 2 == 0 else order[::-1]:
                        url = f"{server.url}/v2/models/{MODEL}/infer"
                        wrk(url, body, headers, concurrency, 0.5)  # warm the connections
                        cpu = cpu_seconds(server.process.pid)
                        window = wrk(url, body, headers, concurrency, args.seconds)
                        assert window.errors == 0, (name, window)
                        t = totals[name]
                        t[0] += window.requests
                        t[1] += window.seconds
                        t[2] += cpu_seconds(server.process.pid) - cpu
                for name, (requests, seconds, cpu) in totals.items():
                    rows.append({
                        "server": name, "concurrency": concurrency,
                        "throughput_rps": round(requests / seconds, 1),
                        "server_cpu_us_per_request": round(cpu / requests * 1e6, 1),
                    })
                    logger.info("%s", rows[-1])
        finally:
            for server in servers.values():
                server.stop(30)
    ratios = {}
    for concurrency in (1, 8, 32):
        at = {row["server"]: row for row in rows if row["concurrency"] == concurrency}
        ratios[f"c{concurrency}"] = round(
            at["guarded"]["throughput_rps"] / at["plain httptools"]["throughput_rps"], 3)
    result = {
        "device": "cpu", "cpus": os.cpu_count(), "python": platform.python_version(),
        "model_source": source, "seconds_per_window": args.seconds, "rounds": args.rounds,
        "load_average_at_end": round(os.getloadavg()[0], 2), "measured_at": time.ctime(),
        "rows": rows, "throughput_guarded_vs_plain": ratios,
    }
    args.out.mkdir(parents=True, exist_ok=True)
    (args.out / "http_guard_cpu.json").write_text(json.dumps(result, indent=2) + "\n")
    lines = [
        "HTTP connection limits (service/rest/http.py) against uvicorn's plain httptools "
        f"protocol, same code, interleaved; cpu ({os.cpu_count()} CPUs), {source}, wrk.",
        "",
        "| server | concurrency | throughput (req/s) | server CPU (µs/req) |",
        "|---|---:|---:|---:|",
        *(f"| {r['server']} | {r['concurrency']} | {r['throughput_rps']} | "
          f"{r['server_cpu_us_per_request']} |" for r in rows),
        "",
        "Throughput guarded / plain: " + ", ".join(f"{k} {v}×" for k, v in ratios.items()),
    ]
    (args.out / "http_guard_cpu.md").write_text("\n".join(lines) + "\n")
    sys.stdout.write("\n".join(lines) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
