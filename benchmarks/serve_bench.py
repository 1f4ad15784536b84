"""Closed-loop load test of ``gated serve``: dynamic batching against a naive baseline.

Usage::

    .venv/bin/python benchmarks/serve_bench.py            # full run, about 2 minutes
    .venv/bin/python benchmarks/serve_bench.py --quick    # smoke run, a few seconds per point

Two real servers run as subprocesses on 127.0.0.1: ``batched`` (the dynamic batcher) and
``naive`` (``GATED_BATCHING=false``: the same model and process doing one forward per request).
For each encoding (V2 binary tensors, V2 JSON) and each concurrency (1, 8, 32), C connections
send requests back to back (closed loop: a connection sends its next request when the previous
answer arrived), alternating between the two servers in short rounds so that both see the same
background load; only one server is loaded at a time. Reported per point: throughput, p50/p99
latency, errors, and the mean batch size read from the server's own ``gated_batch_size``
histogram.

The client speaks HTTP/1.1 over keep-alive sockets with pre-encoded request bodies, so that the
load generator, which shares the machine with the server, costs as little CPU as possible.
Results go to ``benchmarks/results/serve_<device>.json`` and ``.md``.
"""

from __future__ import annotations

import argparse
import asyncio
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from dataclasses import asdict, dataclass
from pathlib import Path

import numpy as np
import orjson
from common import MODEL, RESULTS, ROOT, shipped_repository

from service.local import LocalServer, start_server

CONCURRENCIES = (1, 8, 32)

logger = logging.getLogger("serve_bench")


@dataclass
class Point:
    server: str  # batched | naive
    encoding: str  # binary | json
    concurrency: int
    requests: int
    errors: int
    seconds: float
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    mean_batch_size: float


# ---------------------------------------------------------------------- requests


def _bodies(x: np.ndarray) -> dict[str, tuple[bytes, dict[str, str]]]:
    """Pre-encoded V2 request bodies and headers per encoding, for input ``x`` (1, T)."""
    tensor = {"name": "input", "shape": list(x.shape), "datatype": "FP32"}
    header = orjson.dumps(
        {
            "parameters": {"binary_data_output": True},
            "inputs": [{**tensor, "parameters": {"binary_data_size": x.nbytes}}],
        }
    )
    as_json = orjson.dumps({"inputs": [{**tensor, "data": x.ravel().tolist()}]})
    return {
        "binary": (
            header + x.astype("<f4").tobytes(),
            {"Inference-Header-Content-Length": str(len(header))},
        ),
        "json": (as_json, {}),
    }


def _http_request(port: int, body: bytes, headers: dict[str, str]) -> bytes:
    lines = [
        f"POST /v2/models/{MODEL}/infer HTTP/1.1",
        f"Host: 127.0.0.1:{port}",
        f"Content-Length: {len(body)}",
        *(f"{k}: {v}" for k, v in headers.items()),
    ]
    return ("\r\n".join(lines) + "\r\n\r\n").encode() + body


async def _read_response(reader: asyncio.StreamReader) -> int:
    head = await reader.readuntil(b"\r\n\r\n")
    status = int(head[9:12])
    match = re.search(rb"(?i)\r\ncontent-length:\s*(\d+)", head)
    if match is None:
        raise RuntimeError("response without Content-Length")
    await reader.readexactly(int(match.group(1)))
    return status


async def _connection(
    port: int, payload: bytes, until: float, latencies: list[float], errors: list[int]
) -> None:
    reader, writer = await asyncio.open_connection("127.0.0.1", port)
    try:
        while time.perf_counter() < until:
            start = time.perf_counter()
            writer.write(payload)
            status = await _read_response(reader)
            if status == 200:
                latencies.append(time.perf_counter() - start)
            else:
                errors.append(status)
    finally:
        writer.close()


async def _load(
    port: int, payload: bytes, concurrency: int, seconds: float
) -> tuple[list[float], list[int], float]:
    latencies: list[float] = []
    errors: list[int] = []
    start = time.perf_counter()
    await asyncio.gather(
        *(
            _connection(port, payload, start + seconds, latencies, errors)
            for _ in range(concurrency)
        )
    )
    return latencies, errors, time.perf_counter() - start


# ---------------------------------------------------------------------- servers


def _batch_stats(port: int) -> tuple[float, float]:
    """(sum, count) of the server's gated_batch_size histogram for the model."""
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    total = count = 0.0
    for line in text.splitlines():
        if line.startswith(f'gated_batch_size_sum{{model="{MODEL}"}}'):
            total = float(line.split()[-1])
        elif line.startswith(f'gated_batch_size_count{{model="{MODEL}"}}'):
            count = float(line.split()[-1])
    return total, count


def _start(repository: Path, mode: str, args: argparse.Namespace, log: Path) -> LocalServer:
    settings: dict[str, object] = {
        "batching": "true" if mode == "batched" else "false",
        "max_batch_size": args.max_batch_size,
        "device": args.device,
        "log_level": "warning",
    }
    if args.max_queue_delay_ms is not None:
        settings["max_queue_delay_ms"] = args.max_queue_delay_ms
    return start_server(repository, log, settings, cwd=ROOT, ready_timeout_s=120)


# ---------------------------------------------------------------------- run and report


def _measure(
    port: int, payload: bytes, concurrency: int, seconds: float
) -> tuple[list[float], list[int], float, float, float]:
    """One measured window: latencies, error statuses, seconds, batch-size (sum, count) delta."""
    before = _batch_stats(port)
    latencies, errors, elapsed = asyncio.run(_load(port, payload, concurrency, seconds))
    after = _batch_stats(port)
    return latencies, errors, elapsed, after[0] - before[0], after[1] - before[1]


def _run(args: argparse.Namespace) -> dict[str, object]:
    rng = np.random.default_rng(0)
    x = rng.standard_normal((1, 40)).astype(np.float32)
    bodies = _bodies(x)
    points: list[Point] = []
    modes = ("batched", "naive")
    with tempfile.TemporaryDirectory() as tmp:
        repository, source = shipped_repository(Path(tmp))
        servers: dict[str, LocalServer] = {}
        try:
            # Both servers stay up (an idle one costs nothing) and every point alternates
            # between them, round after round: background load on a shared machine then hits
            # both alike instead of biasing whichever ran during a busy spell.
            for mode in modes:
                servers[mode] = _start(repository, mode, args, Path(tmp) / f"{mode}.log")
            for encoding in ("binary", "json"):
                for concurrency in CONCURRENCIES:
                    pooled: dict[str, list[tuple[list[float], list[int], float, float, float]]]
                    pooled = {mode: [] for mode in modes}
                    for mode in modes:
                        port = servers[mode].port
                        payload = _http_request(port, *bodies[encoding])
                        asyncio.run(_load(port, payload, concurrency, args.warmup))
                    for _ in range(args.rounds):
                        for mode in modes:
                            port = servers[mode].port
                            payload = _http_request(port, *bodies[encoding])
                            pooled[mode].append(
                                _measure(port, payload, concurrency, args.seconds / args.rounds)
                            )
                    for mode in modes:
                        point = _point(mode, encoding, concurrency, pooled[mode])
                        points.append(point)
                        logger.info("%s", point)
        finally:
            for server in servers.values():
                server.stop()
    return {
        "model": MODEL,
        "model_source": source,
        "device": _device_name(args.device),
        "cpus": os.cpu_count(),
        "load_average_at_start": os.getloadavg()[0],
        "python": platform.python_version(),
        "settings": {
            "max_batch_size": args.max_batch_size,
            "max_queue_delay_ms": args.max_queue_delay_ms or "server default",
            "seconds_per_point": args.seconds,
            "rounds_per_point": args.rounds,
            "warmup_seconds": args.warmup,
            "request": "one sequence [1, 40] FP32 per request",
        },
        "points": [asdict(p) for p in points],
        "acceptance_c32": _acceptance(points),
    }


def _point(
    mode: str,
    encoding: str,
    concurrency: int,
    windows: list[tuple[list[float], list[int], float, float, float]],
) -> Point:
    latencies = [v for w in windows for v in w[0]]
    errors = sum(len(w[1]) for w in windows)
    seconds = sum(w[2] for w in windows)
    batch_sum, batches = sum(w[3] for w in windows), sum(w[4] for w in windows)
    lat = np.array(latencies) * 1000.0
    return Point(
        server=mode,
        encoding=encoding,
        concurrency=concurrency,
        requests=len(latencies),
        errors=errors,
        seconds=round(seconds, 3),
        throughput_rps=round(len(latencies) / seconds, 1),
        p50_ms=round(float(np.percentile(lat, 50)), 3) if len(lat) else 0.0,
        p99_ms=round(float(np.percentile(lat, 99)), 3) if len(lat) else 0.0,
        mean_batch_size=round(batch_sum / batches, 2) if batches else 1.0,
    )


def _acceptance(points: list[Point]) -> dict[str, object]:
    """Batched vs naive at concurrency 32, per encoding: throughput ratio and p99."""
    out: dict[str, object] = {}
    for encoding in ("binary", "json"):
        at = {p.server: p for p in points if p.encoding == encoding and p.concurrency == 32}
        if {"batched", "naive"} <= at.keys() and at["naive"].throughput_rps > 0:
            b, n = at["batched"], at["naive"]
            out[encoding] = {
                "throughput_ratio": round(b.throughput_rps / n.throughput_rps, 2),
                "p99_batched_ms": b.p99_ms,
                "p99_naive_ms": n.p99_ms,
                "met": b.throughput_rps >= 2 * n.throughput_rps and b.p99_ms <= n.p99_ms,
            }
    return out


def _device_name(device: str) -> str:
    import torch

    if device != "cpu" and torch.cuda.is_available():
        return re.sub(r"[^a-z0-9]+", "-", torch.cuda.get_device_name().lower()).strip("-")
    return "cpu"


def markdown(result: dict[str, object]) -> str:
    """The results as a markdown table (one row per point)."""
    rows = [
        "| server | encoding | concurrency | throughput (req/s) | p50 (ms) | p99 (ms) "
        "| mean batch | errors |",
        "|---|---|---:|---:|---:|---:|---:|---:|",
    ]
    points = result["points"]
    assert isinstance(points, list)
    for p in points:
        rows.append(
            f"| {p['server']} | {p['encoding']} | {p['concurrency']} | {p['throughput_rps']} "
            f"| {p['p50_ms']} | {p['p99_ms']} | {p['mean_batch_size']} | {p['errors']} |"
        )
    return "\n".join(rows) + "\n"


def main(argv: list[str] | None = None) -> int:
    parser = argparse.ArgumentParser(description=__doc__.splitlines()[0])
    parser.add_argument("--quick", action="store_true", help="1 s per point, for smoke runs")
    parser.add_argument("--seconds", type=float, default=4.0, help="measured seconds per point")
    parser.add_argument("--rounds", type=int, default=4, help="alternations per point")
    parser.add_argument("--warmup", type=float, default=0.5, help="unmeasured seconds per point")
    parser.add_argument("--max-batch-size", type=int, default=32)
    parser.add_argument("--max-queue-delay-ms", type=float, help="default: the server's")
    parser.add_argument("--device", choices=["auto", "cpu", "cuda"], default="auto")
    parser.add_argument("--out", type=Path, default=RESULTS, help="results directory")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.2, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    result = _run(args)
    table = markdown(result)
    args.out.mkdir(parents=True, exist_ok=True)
    stem = f"serve_{result['device']}" + ("_quick" if args.quick else "")
    (args.out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    (args.out / f"{stem}.md").write_text(
        f"Serve benchmark on {result['device']} ({result['cpus']} CPUs, load average "
        f"{result['load_average_at_start']:.1f} at start), {result['model_source']}.\n\n"
        + table
        + "\nAcceptance at concurrency 32: "
        + json.dumps(result["acceptance_c32"])
        + "\n"
    )
    sys.stdout.write(table)
    sys.stdout.write(json.dumps(result["acceptance_c32"]) + "\n")
    return 0


if __name__ == "__main__":
    sys.exit(main())
