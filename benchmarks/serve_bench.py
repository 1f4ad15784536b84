"""Closed-loop load test of ``gated serve``: dynamic batching against a naive baseline, and
REST against gRPC.

Usage::

    .venv/bin/python benchmarks/serve_bench.py            # full run, about 4 minutes
    .venv/bin/python benchmarks/serve_bench.py --quick    # smoke run, a few seconds per point
    .venv/bin/python benchmarks/serve_bench.py --section protocols --baseline /tmp/old
        # REST and gRPC only, beside the server of an older checkout (a source tree)
    .venv/bin/python benchmarks/serve_bench.py --section modes [--model mnist1d-wav2vec2]
        # one model, dense against dynamic keep 0.5 / 0.25 per request, wrk at c8 and c32

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

Protocols (``serve_protocols_<device>``): one batched server, the same [1, 40] FP32 request as
REST binary tensors driven by ``wrk`` and as gRPC raw contents driven by ``h2load`` (both C,
one thread: see ``native_load.py``), at concurrency 1, 8 and 32; gRPC both as C connections
with one call each and as one connection multiplexing C calls (what one tritonclient channel
does). With ``--baseline``, the REST rows of an older checkout's server run interleaved too;
with ``--traced``, those of a server exporting every request's spans.
"""

from __future__ import annotations

import argparse
import asyncio
import functools
import json
import logging
import os
import platform
import re
import sys
import tempfile
import time
from collections.abc import Callable
from dataclasses import asdict, dataclass
from pathlib import Path
from typing import Any

import native_load
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


def _start(
    repository: Path, mode: str, args: argparse.Namespace, log: Path, tree: Path = ROOT,
    **extra: object,
) -> LocalServer:
    settings: dict[str, object] = {
        "batching": "true" if mode == "batched" else "false",
        "max_batch_size": args.max_batch_size,
        "device": args.device,
        "log_level": "warning",
    }
    if args.max_queue_delay_ms is not None:
        settings["max_queue_delay_ms"] = args.max_queue_delay_ms
    if tree != ROOT:
        settings["grpc_port"] = None  # an older server may not know the setting
    settings.update(extra)
    return start_server(repository, log, settings, cwd=tree, ready_timeout_s=120)


# ---------------------------------------------------------------------- run and report


def _measure(
    port: int, payload: bytes, concurrency: int, seconds: float
) -> tuple[list[float], list[int], float, float, float]:
    """One measured window: latencies, error statuses, seconds, batch-size (sum, count) delta."""
    before = _batch_stats(port)
    latencies, errors, elapsed = asyncio.run(_load(port, payload, concurrency, seconds))
    after = _batch_stats(port)
    return latencies, errors, elapsed, after[0] - before[0], after[1] - before[1]


def _facts(source: str, device: str, load_average: float) -> dict[str, object]:
    """What every result file says about the run: model, machine, load when it started."""
    return {
        "model": MODEL,
        "model_source": source,
        "device": _device_name(device),
        "cpus": os.cpu_count(),
        "load_average_at_start": load_average,
        "python": platform.python_version(),
    }


def _run(args: argparse.Namespace) -> dict[str, object]:
    load_average = os.getloadavg()[0]
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
        **_facts(source, args.device, load_average),
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


@dataclass
class ProtocolPoint:
    server: str  # current | baseline
    protocol: str  # rest | grpc
    client: str  # the load generator and its connection layout
    concurrency: int
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    # Server CPU (all its threads) per answered request: steadier than throughput on a shared,
    # noisy machine, and what the front ends' overhead is.
    server_cpu_us_per_request: float


def _grpc_successes(port: int) -> float:
    import urllib.request

    with urllib.request.urlopen(f"http://127.0.0.1:{port}/metrics", timeout=5) as response:
        text = response.read().decode()
    prefix = f'gated_requests_total{{model="{MODEL}",outcome="success",protocol="grpc"}}'
    return sum(float(line.split()[-1]) for line in text.splitlines() if line.startswith(prefix))


def _protocols(args: argparse.Namespace) -> dict[str, object]:
    load_average = os.getloadavg()[0]
    missing = native_load.missing_tools()
    if missing:
        raise SystemExit(
            f"the protocols section needs {' and '.join(missing)}: "
            "apt-get install wrk nghttp2-client"
        )
    x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    rest_body, rest_headers = _bodies(x)["binary"]
    rest_headers = {**rest_headers, "Content-Type": "application/octet-stream"}
    frame = native_load.grpc_frame(x, MODEL)
    points: list[ProtocolPoint] = []
    with tempfile.TemporaryDirectory() as tmp:
        repository, source = shipped_repository(Path(tmp))
        current = _start(repository, "batched", args, Path(tmp) / "current.log")
        baseline = traced = collector = None
        if args.baseline is not None:
            baseline = _start(repository, "batched", args, Path(tmp) / "baseline.log",
                              tree=args.baseline.resolve())
        if args.traced:
            collector = native_load.span_sink()
            traced = _start(repository, "batched", args, Path(tmp) / "traced.log",
                            otel_endpoint=f"http://127.0.0.1:{collector.server_address[1]}")
        try:
            rest_url = f"{current.url}/v2/models/{MODEL}/infer"
            grpc_url = f"http://{current.grpc_address}/inference.GRPCInferenceService/ModelInfer"
            for concurrency in CONCURRENCIES:
                c = concurrency
                runs: dict[tuple[str, str, str], Callable[[float], native_load.Window]] = {
                    ("current", "rest", "wrk"): functools.partial(
                        native_load.wrk, rest_url, rest_body, rest_headers, c),
                    ("current", "grpc", "h2load, C connections"): functools.partial(
                        native_load.h2load, grpc_url, frame, c, 1),
                    ("current", "grpc", "h2load, 1 connection x C streams"): functools.partial(
                        native_load.h2load, grpc_url, frame, 1, c),
                }
                if baseline is not None:
                    runs[("baseline", "rest", "wrk")] = functools.partial(
                        native_load.wrk, f"{baseline.url}/v2/models/{MODEL}/infer", rest_body,
                        rest_headers, c)
                if traced is not None:
                    runs[("traced", "rest", "wrk")] = functools.partial(
                        native_load.wrk, f"{traced.url}/v2/models/{MODEL}/infer", rest_body,
                        {**rest_headers, "traceparent": native_load.TRACEPARENT}, c)
                for run in runs.values():
                    run(args.warmup)
                windows: dict[tuple[str, str, str], list[native_load.Window]] = {
                    key: [] for key in runs
                }
                pids = {"current": current.process.pid}
                if baseline is not None:
                    pids["baseline"] = baseline.process.pid
                if traced is not None:
                    pids["traced"] = traced.process.pid
                for _ in range(args.rounds):
                    for key, run in runs.items():
                        before = _grpc_successes(current.port)
                        cpu = native_load.cpu_seconds(pids[key[0]])
                        window = run(args.seconds / args.rounds)
                        window.server_cpu_ms = (native_load.cpu_seconds(pids[key[0]]) - cpu) * 1e3
                        if key[1] == "grpc":
                            counted = _grpc_successes(current.port) - before
                            # h2load cannot read gRPC statuses: the server's count is the truth.
                            window.errors += max(0, int(window.requests - counted))
                            window.requests = min(window.requests, int(counted))
                        windows[key].append(window)
                for (server, protocol, client), got in windows.items():
                    point = ProtocolPoint(
                        server=server, protocol=protocol,
                        client=client.replace(" C", f" {concurrency}"), concurrency=concurrency,
                        requests=sum(w.requests for w in got),
                        errors=sum(w.errors for w in got),
                        throughput_rps=round(
                            sum(w.requests for w in got) / sum(w.seconds for w in got), 1),
                        p50_ms=round(float(np.mean([w.p50_ms for w in got])), 3),
                        p99_ms=round(float(np.mean([w.p99_ms for w in got])), 3),
                        server_cpu_us_per_request=round(
                            1e3 * sum(w.server_cpu_ms for w in got)
                            / max(1, sum(w.requests for w in got)), 1),
                    )
                    points.append(point)
                    logger.info("%s", point)
        finally:
            for server in (current, baseline, traced):
                if server is not None:
                    server.stop()
            if collector is not None:
                collector.shutdown()
    return {
        **_facts(source, args.device, load_average),
        "baseline": str(args.baseline) if args.baseline is not None else None,
        "traced": "a third server exporting every request's spans over OTLP/HTTP to a local "
                  "sink (requests carry a traceparent)" if args.traced else None,
        "settings": {
            "max_batch_size": args.max_batch_size,
            "seconds_per_point": args.seconds,
            "rounds_per_point": args.rounds,
            "request": "one sequence [1, 40] FP32 per request (REST binary, gRPC raw)",
            "p50_p99": "mean over the rounds of each round's percentiles",
        },
        "points": [asdict(p) for p in points],
        "acceptance_c32": _protocol_acceptance(points),
    }


# ---------------------------------------------------------------------- gate modes

ENCODER = "mnist1d-wav2vec2"
MODES = {"dense": {"gate_mode": "dense"},
         "dynamic 0.5": {"gate_mode": "dynamic", "keep_ratio": 0.5},
         "dynamic 0.25": {"gate_mode": "dynamic", "keep_ratio": 0.25}}


@dataclass
class ModePoint:
    mode: str
    concurrency: int
    requests: int
    errors: int
    throughput_rps: float
    p50_ms: float
    p99_ms: float
    vs_dense: float  # throughput over the dense row's at the same concurrency


def _modes(args: argparse.Namespace) -> dict[str, object]:
    """One batched server, one model, the same [1, 40] request in each gate mode (a request
    parameter), driven by wrk in interleaved rounds: what the masks buy end to end."""
    load_average = os.getloadavg()[0]
    if native_load.missing_tools():
        raise SystemExit("the modes section needs wrk: apt-get install wrk")
    x = np.random.default_rng(0).standard_normal((1, 40)).astype(np.float32)
    repository = args.repository or ROOT / "models" / "pretrained"
    model = args.model
    bodies = {}
    for mode, params in MODES.items():
        header = orjson.dumps({
            "parameters": {"binary_data_output": True, **params},
            "inputs": [{"name": "input", "shape": [1, 40], "datatype": "FP32",
                        "parameters": {"binary_data_size": x.nbytes}}],
        })
        bodies[mode] = (header + x.astype("<f4").tobytes(),
                        {"Inference-Header-Content-Length": str(len(header)),
                         "Content-Type": "application/octet-stream"})
    points: list[ModePoint] = []
    with tempfile.TemporaryDirectory() as tmp:
        server = _start(repository, "batched", args, Path(tmp) / "modes.log", grpc_port=0)
        try:
            url = f"{server.url}/v2/models/{model}/infer"
            for concurrency in (8, 32):
                for body, headers in bodies.values():
                    native_load.wrk(url, body, headers, concurrency, args.warmup)
                windows: dict[str, list[native_load.Window]] = {m: [] for m in MODES}
                for r in range(args.rounds):
                    order = list(MODES)[r % len(MODES):] + list(MODES)[: r % len(MODES)]
                    for mode in order:
                        body, headers = bodies[mode]
                        windows[mode].append(native_load.wrk(
                            url, body, headers, concurrency, args.seconds / args.rounds))
                rps = {m: sum(w.requests for w in got) / sum(w.seconds for w in got)
                       for m, got in windows.items()}
                for mode, got in windows.items():
                    point = ModePoint(
                        mode=mode, concurrency=concurrency,
                        requests=sum(w.requests for w in got),
                        errors=sum(w.errors for w in got),
                        throughput_rps=round(rps[mode], 1),
                        p50_ms=round(float(np.mean([w.p50_ms for w in got])), 3),
                        p99_ms=round(float(np.mean([w.p99_ms for w in got])), 3),
                        vs_dense=round(rps[mode] / rps["dense"], 3),
                    )
                    points.append(point)
                    logger.info("%s", point)
        finally:
            server.stop()
    at = {p.mode: p for p in points if p.concurrency == 32}
    return {
        **_facts(f"{repository}/{model}", args.device, load_average),
        "model": model,
        "settings": {
            "max_batch_size": args.max_batch_size, "seconds_per_point": args.seconds,
            "rounds_per_point": args.rounds,
            "request": "one MNIST-1D-sized sequence [1, 40] FP32 per request (REST binary), "
                       "the gate mode and keep ratio as request parameters",
            "p50_p99": "mean over the rounds of each round's percentiles",
        },
        "points": [asdict(p) for p in points],
        "acceptance_c32": {
            mode: {"throughput_vs_dense": at[mode].vs_dense,
                   "p99_vs_dense": round(at[mode].p99_ms / at["dense"].p99_ms, 3)}
            for mode in MODES if mode != "dense"
        },
    }


def modes_markdown(result: dict[str, object]) -> str:
    return _table(result, [
        ("gate mode", "mode"), ("concurrency", "concurrency"),
        ("throughput (req/s)", "throughput_rps"), ("vs dense", "vs_dense"),
        ("p50 (ms)", "p50_ms"), ("p99 (ms)", "p99_ms"), ("errors", "errors"),
    ])


def _protocol_acceptance(points: list[ProtocolPoint]) -> dict[str, object]:
    at = {(p.server, p.client): p for p in points if p.concurrency == 32}
    rest = at.get(("current", "wrk"))
    out: dict[str, object] = {}
    if rest is None:
        return out
    for client in ("h2load, 32 connections", "h2load, 1 connection x 32 streams"):
        grpc = at.get(("current", client))
        if grpc is not None:
            out[f"grpc ({client}) vs rest"] = {
                "throughput_ratio": round(grpc.throughput_rps / rest.throughput_rps, 2),
                "cpu_per_request_ratio": round(
                    grpc.server_cpu_us_per_request / rest.server_cpu_us_per_request, 2),
                "p99_grpc_ms": grpc.p99_ms, "p99_rest_ms": rest.p99_ms,
                "met": grpc.throughput_rps >= rest.throughput_rps and grpc.p99_ms <= rest.p99_ms,
            }
    on = at.get(("traced", "wrk"))
    if on is not None:
        out["rest traced vs untraced"] = {
            "throughput_ratio": round(on.throughput_rps / rest.throughput_rps, 3),
            "p99_traced_ms": on.p99_ms, "p99_untraced_ms": rest.p99_ms,
        }
    old = at.get(("baseline", "wrk"))
    if old is not None:
        out["rest current vs baseline"] = {
            "throughput_ratio": round(rest.throughput_rps / old.throughput_rps, 3),
            "p99_current_ms": rest.p99_ms, "p99_baseline_ms": old.p99_ms,
            "cpu_per_request_ratio": round(
                rest.server_cpu_us_per_request / old.server_cpu_us_per_request, 3),
        }
    return out


def protocol_markdown(result: dict[str, object]) -> str:
    """The protocol results as a markdown table (one row per point)."""
    return _table(result, [
        ("server", "server"), ("protocol", "protocol"), ("load generator", "client"),
        ("concurrency", "concurrency"), ("throughput (req/s)", "throughput_rps"),
        ("p50 (ms)", "p50_ms"), ("p99 (ms)", "p99_ms"),
        ("server CPU (µs/req)", "server_cpu_us_per_request"), ("errors", "errors"),
    ])


def _table(result: dict[str, object], columns: list[tuple[str, str]]) -> str:
    """``result["points"]`` as a markdown table: (heading, key) per column; numbers right."""
    points = result["points"]
    assert isinstance(points, list)
    numeric = [isinstance(points[0][key], int | float) if points else False for _, key in columns]
    rows = [
        "| " + " | ".join(heading for heading, _ in columns) + " |",
        "|" + "|".join("---:" if n else "---" for n in numeric) + "|",
    ]
    rows += ["| " + " | ".join(str(p[key]) for _, key in columns) + " |" for p in points]
    return "\n".join(rows) + "\n"


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
    """The batching results as a markdown table (one row per point)."""
    return _table(result, [
        ("server", "server"), ("encoding", "encoding"), ("concurrency", "concurrency"),
        ("throughput (req/s)", "throughput_rps"), ("p50 (ms)", "p50_ms"), ("p99 (ms)", "p99_ms"),
        ("mean batch", "mean_batch_size"), ("errors", "errors"),
    ])


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
    parser.add_argument("--section", choices=["batching", "protocols", "modes", "all"],
                        default="all")
    parser.add_argument("--repository", type=Path,
                        help="modes: the model repository (default: the shipped models)")
    parser.add_argument("--model", default=ENCODER, help="modes: the model to load")
    parser.add_argument("--baseline", type=Path,
                        help="source tree of an older checkout: its REST server runs beside")
    parser.add_argument("--traced", action="store_true",
                        help="also a REST server with tracing on (needs the [otel] extra)")
    args = parser.parse_args(argv)
    if args.quick:
        args.seconds, args.warmup, args.rounds = 1.0, 0.2, 2
    logging.basicConfig(level=logging.INFO, format="%(asctime)s %(message)s", stream=sys.stderr)
    args.out.mkdir(parents=True, exist_ok=True)
    suffix = "_quick" if args.quick else ""
    if args.section in ("modes", "all"):
        modes = _modes(args)
        _write(args.out, f"serve_modes_{modes['device']}{suffix}",
               f"Gate modes of {args.model} through the server", modes, modes_markdown(modes),
               "At concurrency 32, against dense")
        if args.section == "modes":
            return 0
    if args.section in ("protocols", "all"):
        protocols = _protocols(args)
        _write(args.out, f"serve_protocols_{protocols['device']}{suffix}", "REST and gRPC",
               protocols, protocol_markdown(protocols), "At concurrency 32")
        if args.section == "protocols":
            return 0
    result = _run(args)
    _write(args.out, f"serve_{result['device']}{suffix}", "Serve benchmark", result,
           markdown(result), "Acceptance at concurrency 32")
    return 0


def _write(
    out: Path, stem: str, title: str, result: dict[str, Any], table: str, verdict: str
) -> None:
    """``<stem>.json`` and ``<stem>.md`` in ``out``; the table and verdict to stdout too."""
    (out / f"{stem}.json").write_text(json.dumps(result, indent=2) + "\n")
    summary = json.dumps(result["acceptance_c32"])
    (out / f"{stem}.md").write_text(
        f"{title} on {result['device']} ({result['cpus']} CPUs, load average "
        f"{result['load_average_at_start']:.1f} at start), {result['model_source']}.\n\n"
        + table + f"\n{verdict}: {summary}\n"
    )
    sys.stdout.write(table + summary + "\n")


if __name__ == "__main__":
    sys.exit(main())
